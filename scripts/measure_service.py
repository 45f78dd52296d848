"""Measure the service as a user meets it, from process start to steady state, and kill -9 → first image.

Steps: start → ready → first image → compiled path live → first image after it; latency through the OpenAI route
and the UI's API; four users at once; recompilations over mixed prompt lengths and sizes; optionally kill -9 of the
engine process → the waiting request's image, and kill -9 → ready → first image under supervisord.

    .venv/bin/python scripts/measure_service.py --json service.json -- --model-dir /opt/z-image-turbo/weights
    .venv/bin/python scripts/measure_service.py --mixed 0 --kill-trials 3 --json kill.json -- --model-dir DIR
    .venv/bin/python scripts/measure_service.py --requests 2 --size 256x256 --steps 2 --mixed 6 \\
        --mixed-sizes 256x256,384x256,256x384 -- --demo                                       # a quick run on CPU

Everything after `--` goes to app.py; --kill-trials installs that same command under a standalone supervisord of
its own. Every request carries a prompt not sent before (no prompt-cache hit) and a seed of its own, which finds
its line in the service's log: the engine's time per stage and the path (eager or compiled) that served it. Prints
a table; --json writes every figure, and what was measured before a step failed.
"""

from __future__ import annotations

import argparse
import base64
import collections
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import measure_restart  # noqa: E402
from install_service import DEFAULT_STARTSECS  # noqa: E402
from loadtest import error_kind, percentile  # noqa: E402
from local_service import FIELD, PROJECT_DIR, free_port, logged_requests, start_service, stop_service  # noqa: E402
from measure_start import round_trip, wait_compiled  # noqa: E402

READY_TIMEOUT_S = 600  # full-size weights from a cold page cache
COMPILE_TIMEOUT_S = 600  # a cold compile cache took 92 s on an H100
REQUEST_TIMEOUT_S = 900  # a request may wait behind compilation; the service's queue timeout (300 s) ends it sooner
RETRY_AFTER_S = 0.25  # how soon the user's client of a kill trial tries again after connection refused or 503
PROGRAM = "z-image-turbo"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STAGES = ("wait", "encode", "denoise", "decode", "save")
# Two from each of the UI's size categories (webui/resolutions.py), both orientations, square and the extreme
# ratios, all within the default --max-w/--max-h of 2048: the shapes a compiled graph must serve.
MIXED_SIZES = ("1024x1024", "1344x576", "1120x1440", "1536x864", "1536x1536", "1152x2048")
MIXED_MAX_WORDS = 600  # past the text encoder's 512-token budget, where the engine cuts prompts
# Lines that TORCH_LOGS=recompiles (set for the service here) writes for each recompilation, and the one torch
# writes when a function has recompiled so often that it gives up and runs it eagerly.
RECOMPILE_MARKER = "Recompiling function"
RECOMPILE_LIMIT_MARKER = "torch._dynamo hit config.recompile_limit"
LIVE_MARKER = "compiled path live"
ADAPTER_MIXED_REQUESTS = 20
EDIT_MIXED_REQUESTS = 12
START_MARKER = " zimage.app start version="
# With --replicas, Ray forwards a replica's log lines to the front's log a moment after the answer has left.
LOG_LAG_S = 5.0
VOCABULARY = (
    "a", "lighthouse", "on", "cliff", "at", "dusk", "misty", "harbour", "old", "fishing", "boat", "golden", "hour",
    "portrait", "of", "woman", "with", "red", "scarf", "city", "street", "rain", "neon", "signs", "reflections",
    "mountain", "lake", "pine", "forest", "snow", "morning", "fog", "cat", "sleeping", "window", "sill", "sunlight",
    "bowl", "ramen", "steam", "wooden", "table", "watercolor", "oil", "painting", "photo", "35mm", "film", "grain",
    "wide", "angle", "close-up", "soft", "light", "dramatic", "shadows", "desert", "dunes", "night", "stars",
    "market", "stall", "oranges", "lanterns", "bridge", "river", "autumn", "leaves", "robot", "garden", "flowers",
    "library", "dust", "glass", "vase", "tulips", "train", "station", "crowd", "umbrella", "blue", "green",
)


@dataclass(frozen=True)
class Job:
    prompt: str
    seed: int
    size: str  # "WxH"
    steps: int
    loras: tuple[tuple[str, float], ...] = ()  # (adapter name, strength)
    edit: str = ""  # "": text-to-image; "image" or "inpaint": through /v1/images/edits
    strength: float | None = None  # an edit's (None: the service's default)


class FreshRequests:
    """Jobs whose prompt was never sent before (so the service's prompt cache cannot answer) and whose seed is
    their own (the key to their line in the log). Deterministic: two runs send the same prompts."""

    def __init__(self) -> None:
        self._random = random.Random(0)
        self._sent: set[str] = set()
        self._next_seed = 1000

    def job(self, size: str, steps: int, words: int | None = None) -> Job:
        """A job with a prompt of `words` words, or of 5 to 60 when not given."""
        count = words or self._random.randint(5, 60)
        prompt = " ".join(self._random.choices(VOCABULARY, k=count))
        while prompt in self._sent:  # only very short prompts can come out the same twice
            prompt = " ".join(self._random.choices(VOCABULARY, k=count))
        self._sent.add(prompt)
        self._next_seed += 1
        return Job(prompt, self._next_seed, size, steps)


class ServiceRefused(RuntimeError):
    """The service answered with an HTTP error; the message is its body."""

    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body}")
        self.status = status


def note(message: str) -> None:
    """Progress on stderr: a full run on the GPU takes minutes."""
    print(message, file=sys.stderr, flush=True)


def readiness(url: str) -> dict[str, object]:
    with urllib.request.urlopen(f"{url}/readyz", timeout=5) as response:
        return json.load(response)


def openai_image(url: str, job: Job) -> dict[str, object]:
    """One image through POST /v1/images/generations as b64_json, as an OpenAI client sends it: the client time
    (request sent → whole JSON received) and the payload's size. ServiceRefused or OSError when it fails."""
    body = {"prompt": job.prompt, "size": job.size, "seed": job.seed, "steps": job.steps, "n": 1,
            "response_format": "b64_json"}
    if job.loras:
        body["loras"] = [{"name": name, "scale": scale} for name, scale in job.loras]
    request = urllib.request.Request(f"{url}/v1/images/generations", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            image = json.load(response)["data"][0]
    except urllib.error.HTTPError as error:
        raise ServiceRefused(error.code, error.read().decode(errors="replace")) from None
    client_ms = (time.perf_counter() - started) * 1000
    png = base64.b64decode(image["b64_json"])
    if not png.startswith(PNG_SIGNATURE) or image["seed"] != job.seed:
        raise RuntimeError(f"seed {job.seed}: the answer is not this request's PNG (seed {image['seed']})")
    return {**_describe(job), "client_ms": round(client_ms, 1), "b64_bytes": len(image["b64_json"]),
            "png_bytes": len(png)}


def picture_png(width: int, height: int) -> bytes:
    """A photo-like picture to edit: smooth gradients, a few shapes and a little grain, as a PNG."""
    import io

    import numpy as np
    from PIL import Image, ImageDraw

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    pixels = np.stack([x / width * 200 + 30, y / height * 180 + 40, (x + y) / (width + height) * 120 + 60], -1)
    pixels += np.random.default_rng(0).normal(0, 4, pixels.shape)
    picture = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    draw.ellipse((width // 5, height // 5, width // 2, height // 2), fill=(220, 60, 40))
    draw.rectangle((width // 2, height // 2, width * 4 // 5, height * 9 // 10), fill=(40, 90, 160))
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    return buffer.getvalue()


def mask_png(width: int, height: int) -> bytes:
    """OpenAI's mask: transparent (to repaint) over the left half, opaque elsewhere."""
    import io

    from PIL import Image

    mask = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, width // 2, height))
    buffer = io.BytesIO()
    mask.save(buffer, "PNG")
    return buffer.getvalue()


def openai_edit(url: str, job: Job) -> dict[str, object]:
    """One edit through POST /v1/images/edits (multipart, as OpenAI's client sends it) of a picture of the job's
    size, with a mask for "inpaint": the client time and the payload's size."""
    import httpx

    width, height = map(int, job.size.split("x"))
    files = {"image": ("picture.png", picture_png(width, height), "image/png")}
    if job.edit == "inpaint":
        files["mask"] = ("mask.png", mask_png(width, height), "image/png")
    fields = {"prompt": job.prompt, "size": job.size, "seed": str(job.seed), "steps": str(job.steps),
              "response_format": "b64_json", **({"strength": str(job.strength)} if job.strength is not None else {})}
    started = time.perf_counter()
    response = httpx.post(f"{url}/v1/images/edits", data=fields, files=files, timeout=REQUEST_TIMEOUT_S)
    client_ms = (time.perf_counter() - started) * 1000
    if response.status_code != 200:
        raise ServiceRefused(response.status_code, response.text)
    image = response.json()["data"][0]
    png = base64.b64decode(image["b64_json"])
    if not png.startswith(PNG_SIGNATURE) or image["seed"] != job.seed:
        raise RuntimeError(f"seed {job.seed}: the answer is not this edit's PNG (seed {image['seed']})")
    return {**_describe(job), "client_ms": round(client_ms, 1), "b64_bytes": len(image["b64_json"]),
            "png_bytes": len(png)}


def any_image(url: str, job: Job) -> dict[str, object]:
    return openai_edit(url, job) if job.edit else openai_image(url, job)


def gradio_image(client, job: Job) -> dict[str, object]:
    """One image through the UI's API and the PNG's download (measure_start.round_trip)."""
    return {**_describe(job), "client_ms": round(round_trip(client, job.prompt, job.size, job.seed, job.steps), 1)}


def _describe(job: Job) -> dict[str, object]:
    return {"seed": job.seed, "size": job.size, "words": len(job.prompt.split())}


def wait_compiled_in_log(log_path: Path, timeout_s: float) -> str:
    """wait_compiled for --replicas: /readyz shows the engine state of the replica that answered last, so the
    replica's own log line says when its compiled path went live."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if LIVE_MARKER in log_path.read_text(errors="replace"):
            return "on"
        time.sleep(0.2)
    return "still compiling"


def with_engine_times(records: list[dict[str, object]], log_path: Path) -> list[dict[str, object]]:
    """Each record with the engine's times for its request and the path that served it ("path": None where the
    engine does not log one), from the log line its seed finds."""
    deadline = time.monotonic() + LOG_LAG_S
    while True:
        logged = logged_requests(log_path)
        if all(record["seed"] in logged for record in records) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for record in records:
        line = logged.get(record["seed"])
        if line is None:
            raise RuntimeError(f"no request line with seed={record['seed']} in {log_path}: has its format changed?")
        record.update({f"{stage}_ms": line[f"{stage}_ms"] for stage in STAGES},
                      engine_total_ms=line["total_ms"], path=line.get("path"))
    return records


def start_phases(log_path: Path) -> dict[str, float | None]:
    """The service's own account of its latest start, from its log: seconds from the process's birth to ready, and
    the shares of the imports before its first line, of loading the weights and of the warm-up (None where a line
    is missing)."""
    deadline = time.monotonic() + LOG_LAG_S  # /readyz may answer a moment before the ready line is written
    while True:
        text = log_path.read_text(errors="replace")
        latest = text[text.rfind(START_MARKER):].splitlines() if START_MARKER in text else []
        if any("ready url=" in line for line in latest) or time.monotonic() > deadline:
            break
        time.sleep(0.1)

    def seconds(marker: str, key: str) -> list[float]:
        return [float(fields[key]) for line in latest if marker in line
                for fields in [dict(FIELD.findall(line))] if key in fields]

    ready, warm_up = seconds("ready url=", "seconds_since_process_start"), seconds("warm-up done", "seconds")
    imports, loaded = seconds(START_MARKER, "seconds_since_process_start"), seconds("loaded component=", "seconds")
    return {"process_ready_s": ready[0] if ready else None, "imports_s": imports[0] if imports else None,
            "load_s": round(sum(loaded), 2) if loaded else None, "warm_up_s": warm_up[0] if warm_up else None}


def one_request(url: str, job: Job, log_path: Path) -> dict[str, object]:
    return with_engine_times([openai_image(url, job)], log_path)[0]


def sequential_summary(records: list[dict[str, object]]) -> dict[str, object]:
    """Client time (median, p95), the engine's own total and stages (medians), and what lies between the two:
    HTTP, the queue's hand-offs, base64 or the PNG download."""
    client_ms = [record["client_ms"] for record in records]
    summary = {
        "requests": len(records),
        "client_ms_median": round(statistics.median(client_ms), 1),
        "client_ms_p95": percentile(client_ms, 0.95),
        "engine_total_ms_median": statistics.median(record["engine_total_ms"] for record in records),
        "overhead_ms_median": round(statistics.median(record["client_ms"] - record["engine_total_ms"]
                                                      for record in records), 1),
        "stage_ms_median": {stage: statistics.median(record[f"{stage}_ms"] for record in records)
                            for stage in STAGES},
        "paths": dict(collections.Counter(str(record["path"]) for record in records)),
    }
    if "b64_bytes" in records[0]:
        summary["b64_bytes_median"] = statistics.median(record["b64_bytes"] for record in records)
        summary["png_bytes_median"] = statistics.median(record["png_bytes"] for record in records)
    return summary | {"each": records}


def concurrent_users(url: str, jobs_per_user: list[list[Job]], log_path: Path) -> dict[str, object]:
    """Users at once, each sending its jobs one after another; refusals (a full queue) are counted, not fatal."""

    def user(jobs: list[Job]) -> tuple[list[dict[str, object]], list[str]]:
        records, errors = [], []
        for job in jobs:
            try:
                records.append(openai_image(url, job))
            except (ServiceRefused, OSError) as error:
                errors.append(error_kind(error))
        return records, errors

    started = time.perf_counter()
    with ThreadPoolExecutor(len(jobs_per_user)) as pool:
        results = list(pool.map(user, jobs_per_user))
    wall_s = time.perf_counter() - started
    records = with_engine_times([record for user_records, _ in results for record in user_records], log_path)
    latency_s = [record["client_ms"] / 1000 for record in records]
    return {
        "clients": len(jobs_per_user), "per_client": len(jobs_per_user[0]), "ok": len(records),
        "errors": dict(collections.Counter(kind for _, errors in results for kind in errors)),
        "wall_s": round(wall_s, 2), "images_per_s": round(len(records) / wall_s, 3),
        "latency_s_p50": round(percentile(latency_s, 0.5), 3) if records else None,
        "latency_s_p95": round(percentile(latency_s, 0.95), 3) if records else None,
        "each": records,
    }


def mixed_jobs(fresh: FreshRequests, count: int, sizes: list[str], steps: int) -> list[Job]:
    """`count` prompts from 1 word up to MIXED_MAX_WORDS, more short ones than long (spaced by the square, as
    people write them), cycling through `sizes`."""
    fractions = [number / max(count - 1, 1) for number in range(count)]
    return [fresh.job(sizes[number % len(sizes)], steps, words=round(1 + (MIXED_MAX_WORDS - 1) * fraction ** 2))
            for number, fraction in enumerate(fractions)]


def mixed_run(url: str, jobs: list[Job], log_path: Path) -> dict[str, object]:
    started = time.perf_counter()
    records = with_engine_times([openai_image(url, job) for job in jobs], log_path)
    return {"requests": len(records), "sizes": list(dict.fromkeys(job.size for job in jobs)),
            "steps": jobs[0].steps, "words_min": min(record["words"] for record in records),
            "words_max": max(record["words"] for record in records), "wall_s": round(time.perf_counter() - started, 2),
            "client_ms_max": max(record["client_ms"] for record in records), "each": records}


def recompilations(log_path: Path) -> dict[str, int]:
    """Recompilations logged after the compiled path went live, or in the whole log where it never did
    (compilation off or failed): after a warm-up that covered every shape, each one is a user's request stalled."""
    text = log_path.read_text(errors="replace")
    lines = text[max(text.rfind(LIVE_MARKER), 0):].splitlines()
    return {"recompiles_after_live": sum(RECOMPILE_MARKER in line for line in lines),
            "recompile_limit_hits": sum(RECOMPILE_LIMIT_MARKER in line for line in lines)}


def measure_service(args: argparse.Namespace, fresh: FreshRequests, figures: dict[str, object]) -> None:
    """Steps 1–8 against one service started here, filling `figures` as they go; the service is stopped after."""
    def job() -> Job:  # steps 2–7 send one size and step count
        return fresh.job(args.size, args.steps)

    started = time.monotonic()
    service, url = start_service(args.app_args, args.log, env={"TORCH_LOGS": "recompiles"},
                                 timeout_s=args.ready_timeout)
    try:
        # 1. Process start → /readyz 200, and which path serves at that moment.
        figures["ready_s"] = round(time.monotonic() - started, 2)
        figures["start"] = start_phases(args.log)
        state = readiness(url)
        figures.update(serving_at_ready=state.get("serving"), compiled_at_ready=state["compiled"])
        note(f"ready after {figures['ready_s']} s")
        # 2. The first user, right at ready: served eagerly, or waiting for compilation?
        first = one_request(url, job(), args.log)
        figures.update(first_request_after_ready_s=round(first["client_ms"] / 1000, 2),
                       first_request_after_ready_path=first["path"], first_request_after_ready=first)
        # 3. Compilation finished (or never ran: "off").
        figures["compiled"] = (wait_compiled_in_log(args.log, args.compile_timeout) if "--replicas" in args.app_args
                               else wait_compiled(url, args.compile_timeout))
        finished = figures["compiled"] in ("on", "off", "failed")  # not "still compiling" at the timeout
        figures["compiled_live_s"] = round(time.monotonic() - started, 2) if finished else None
        note(f"compiled: {figures['compiled']} at {figures['compiled_live_s']} s")
        # 4. The first user after that.
        first = one_request(url, job(), args.log)
        figures.update(first_request_after_live_s=round(first["client_ms"] / 1000, 2),
                       first_request_after_live_path=first["path"], first_request_after_live=first)
        # 5. Sequential requests through the OpenAI route.
        figures["openai"] = sequential_summary(with_engine_times([openai_image(url, job())
                                                                  for _ in range(args.requests)], args.log))
        note(f"OpenAI route: median {figures['openai']['client_ms_median']} ms")
        # 6. The same through the UI's API (gradio_client), as the web page sends them.
        from gradio_client import Client

        client = Client(url, verbose=False, download_files=False)
        figures["gradio"] = sequential_summary(with_engine_times([gradio_image(client, job())
                                                                  for _ in range(args.requests)], args.log))
        note(f"gradio_client: median {figures['gradio']['client_ms_median']} ms")
        # 7. Users at once.
        jobs = [[job() for _ in range(args.per_client)] for _ in range(args.concurrent_clients)]
        figures["concurrent"] = concurrent_users(url, jobs, args.log)
        note(f"{args.concurrent_clients} users at once: {figures['concurrent']['images_per_s']} images/s")
        # 8. Mixed prompt lengths and sizes, then the recompilations they (or anything above) caused.
        if args.mixed:
            figures["mixed"] = mixed_run(url, mixed_jobs(fresh, args.mixed, args.mixed_sizes, args.mixed_steps),
                                         args.log)
        figures.update(recompilations(args.log))
        note(f"recompiles after live: {figures['recompiles_after_live']}")
        # 9. LoRA adapters: none, one, two; switching between two; a mixed run; recompiles over it all.
        if args.adapters:
            figures["adapters"] = measure_adapters(url, args, fresh)
            figures.update(recompilations(args.log))
            note(f"adapters: {figures['adapters']['summary']}; recompiles after live: "
                 f"{figures['recompiles_after_live']}")
        # 10. Edits: image-to-image and inpainting, a mixed run with text-to-image, the output formats' bytes.
        if args.edits:
            figures["edits"] = measure_edits(url, args, fresh)
            figures.update(recompilations(args.log))
            note(f"edits: image-to-image {figures['edits']['image_0.6']['client_ms_median']} ms, inpainting "
                 f"{figures['edits']['inpaint']['client_ms_median']} ms; recompiles after live: "
                 f"{figures['recompiles_after_live']}")
        # 11. Hostile uploads: decompression bombs and oversized files, refused; the memory they leave.
        if args.upload_trials:
            figures["uploads"] = measure_uploads(url, service.pid, args.upload_trials)
            note(f"uploads: {figures['uploads']}")
        # 12. kill -9 of the engine process while one request runs and one waits.
        if args.engine_kill_trials:
            figures["engine_kill"] = measure_engine_kills(url, args, fresh)
    finally:
        stop_service(service)


def measure_edits(url: str, args: argparse.Namespace, fresh: FreshRequests) -> dict[str, object]:
    """--requests image-to-image edits at strength 0.6 and as many inpaintings (the left half), each a new prompt
    on a picture of --size; then a mixed run of text-to-image, image-to-image and inpainting over the mixed sizes;
    and the bytes of one --size image as PNG, JPEG 90 and WebP 90."""
    figures: dict[str, object] = {}
    for name, edit, strength in (("image_0.6", "image", 0.6), ("inpaint", "inpaint", None)):
        figures[name] = sequential_summary(with_engine_times(
            [openai_edit(url, replace(fresh.job(args.size, args.steps), edit=edit, strength=strength))
             for _ in range(args.requests)], args.log))
    kinds = [("", None), ("image", 0.6), ("inpaint", None), ("image", 0.3)]
    mixed = [replace(fresh.job(args.mixed_sizes[number % len(args.mixed_sizes)], args.mixed_steps),
                     edit=kinds[number % len(kinds)][0], strength=kinds[number % len(kinds)][1])
             for number in range(EDIT_MIXED_REQUESTS)]
    started = time.perf_counter()
    figures["mixed"] = {"each": with_engine_times([any_image(url, job) for job in mixed], args.log),
                        "wall_s": round(time.perf_counter() - started, 2)}
    figures["bytes"] = {}
    job = fresh.job(args.size, args.steps)
    for output_format in ("png", "jpeg", "webp"):
        body = {"prompt": job.prompt, "size": job.size, "seed": job.seed, "steps": job.steps,
                "response_format": "b64_json", "output_format": output_format, "output_compression": 90}
        request = urllib.request.Request(f"{url}/v1/images/generations", data=json.dumps(body).encode(),
                                         headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            figures["bytes"][output_format] = len(base64.b64decode(json.load(response)["data"][0]["b64_json"]))
    return figures


def measure_uploads(url: str, service_pid: int, trials: int) -> dict[str, object]:
    """Hostile uploads against the edit route: `trials` times a PNG of a few hundred bytes whose header claims
    50,000 × 50,000 pixels, and `trials` times an upload one byte over 20 MB; the time each takes to be refused
    (median) and the service's resident memory before and after (the front's process, and its children)."""
    import struct
    import zlib

    import httpx

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = (PNG_SIGNATURE + chunk(b"IHDR", struct.pack(">IIBBBBB", 50_000, 50_000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))
    oversized = PNG_SIGNATURE + b"\0" * (20 * 10**6 + 1 - len(PNG_SIGNATURE))
    service = psutil.Process(service_pid)

    def resident_mib() -> float:
        processes = [service, *service.children(recursive=True)]
        return round(sum(process.memory_info().rss for process in processes) / 2**20, 1)

    figures: dict[str, object] = {"rss_mib_before": resident_mib()}
    with httpx.Client(timeout=60) as client:
        for name, data in (("bomb", bomb), ("over_20_mb", oversized)):
            seconds, statuses = [], collections.Counter()
            for _ in range(trials):
                started = time.perf_counter()
                response = client.post(f"{url}/v1/images/edits", data={"prompt": "x"},
                                       files={"image": ("p.png", data, "image/png")})
                seconds.append(time.perf_counter() - started)
                statuses[response.status_code] += 1
            figures[name] = {"refused_ms_median": round(statistics.median(seconds) * 1000, 1),
                             "refused_ms_max": round(max(seconds) * 1000, 1), "statuses": dict(statuses)}
    figures["rss_mib_after"] = resident_mib()
    return figures


def measure_adapters(url: str, args: argparse.Namespace, fresh: FreshRequests) -> dict[str, object]:
    """With the adapters named A, B, C by --adapters (A and B of one rank): --requests requests in a row without
    adapters, with A, and with A and C (the slots written once, then held); then A and B in turn (each request
    writes the slots: the switch); then a mixed run of 20 over sizes and sets, the strengths changing too. Each
    request's time through the OpenAI route, the engine's time to write the slots, its peak GPU memory."""
    first, second, third = args.adapters
    runs = {"none": (), "one": ((first, 0.8),), "two": ((first, 0.8), (third, 0.5))}
    figures: dict[str, object] = {}
    for name, loras in runs.items():
        figures[name] = sequential_summary(with_adapter_fields(with_engine_times(
            [openai_image(url, replace(fresh.job(args.size, args.steps), loras=loras)) for _ in range(args.requests)],
            args.log), args.log))
    switching = [((first, 0.8),), ((second, 0.8),)]
    figures["switch"] = sequential_summary(with_adapter_fields(with_engine_times(
        [openai_image(url, replace(fresh.job(args.size, args.steps), loras=switching[number % 2]))
         for number in range(args.requests)], args.log), args.log))
    sets = [(), ((first, 1.0),), ((second, 0.7),), ((first, 0.6), (second, 0.6)), ((first, -0.4),), (),
            ((first, 0.5), (third, 1.2)), ((third, 0.9),)]
    mixed = [replace(fresh.job(args.mixed_sizes[number % len(args.mixed_sizes)], args.mixed_steps),
                     loras=sets[number % len(sets)]) for number in range(ADAPTER_MIXED_REQUESTS)]
    figures["mixed"] = mixed_run(url, mixed, args.log)
    none_ms = figures["none"]["client_ms_median"]
    load_ms = [record["lora_load_ms"] for record in figures["switch"]["each"][1:]]  # the first may find them loaded
    figures["switch_load_ms_median"] = statistics.median(load_ms)
    peaks = {name: max(record["gpu_peak_allocated_mib"] or 0 for record in figures[name]["each"]) for name in runs}
    figures["gpu_peak_allocated_mib"] = peaks
    figures["summary"] = (f"none {none_ms} ms, one {figures['one']['client_ms_median']} ms "
                          f"({(figures['one']['client_ms_median'] / none_ms - 1) * 100:+.1f} %), two "
                          f"{figures['two']['client_ms_median']} ms, switching {figures['switch']['client_ms_median']} "
                          f"ms (slots written in {figures['switch_load_ms_median']} ms), peak MiB {peaks}")
    return figures


def with_adapter_fields(records: list[dict[str, object]], log_path: Path) -> list[dict[str, object]]:
    """Each record with the time its engine took to write the adapter slots (0: no adapters, or the slots held them
    already) and its peak GPU memory (None off the GPU), from its log line."""
    logged = logged_requests(log_path)
    for record in records:
        line = logged[record["seed"]]
        record["lora_load_ms"] = float(line.get("lora_load_ms", 0))
        peak = line.get("gpu_peak_allocated_mib")
        record["gpu_peak_allocated_mib"] = int(peak) if peak is not None else None
    return records


def measure_engine_kills(url: str, args: argparse.Namespace, fresh: FreshRequests) -> dict[str, object]:
    """Each trial: one request on the engine process and one waiting behind it, then SIGKILL to the engine process
    (pipeline.engine_process). Seconds from the kill to the waiting request's image, which the next engine process
    makes; what the running one got."""
    trials = []
    for number in range(1, args.engine_kill_trials + 1):
        wait_for_log(args.log, "standby engine process ready number=", count=number, timeout_s=args.ready_timeout)
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(_outcome, url, fresh.job(args.size, args.steps))
            wait_until_true(lambda: readiness(url)["busy"], args.ready_timeout)
            waiting = pool.submit(_outcome, url, fresh.job(args.size, args.steps))
            wait_until_true(lambda: queue_depth(url) >= 1, 60)
            killed_pid = engine_pid(args.log)
            psutil.Process(killed_pid).kill()
            killed_at = time.monotonic()
            waited, waited_at = waiting.result()
            ran, _ = running.result()
        ready = [float(seconds) for seconds in re.findall(r"engine process ready number=\d+ pid=\d+ seconds=([\d.]+) "
                                                          r"restarts=[1-9]", args.log.read_text())]
        trials.append({"killed_pid": killed_pid, "running_request": ran, "waiting_request": waited,
                       "first_image_s": round(waited_at - killed_at, 2),
                       "engine_ready_s": ready[-1] if ready else None})
        note(f"engine kill trial {number}: the waiting request's image {trials[-1]['first_image_s']} s after the kill")
    return {"trials": trials, "first_image_s_median": statistics.median(t["first_image_s"] for t in trials)}


def _outcome(url: str, job: Job) -> tuple[object, float]:
    """The request's client time in ms, or the HTTP status it was refused with; and when the answer came."""
    try:
        return openai_image(url, job)["client_ms"], time.monotonic()
    except ServiceRefused as error:
        return f"HTTP {error.status}", time.monotonic()


def engine_pid(log_path: Path) -> int:
    """The running engine process's pid, from the service's log."""
    return int(re.findall(r"engine process ready number=\d+ pid=(\d+) seconds=", log_path.read_text())[-1])


def queue_depth(url: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
        found = re.search(r"^zimage_queue_depth ([\d.]+)$", response.read().decode(), re.M)
    return float(found[1]) if found else 0.0


def wait_until_true(condition, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not so after {timeout_s} s")
        time.sleep(0.05)


def wait_for_log(log_path: Path, marker: str, count: int, timeout_s: float) -> None:
    """Until `marker` appears `count` times in the log."""
    wait_until_true(lambda: log_path.read_text(errors="replace").count(marker) >= count, timeout_s)


def measure_kill_trials(args: argparse.Namespace, fresh: FreshRequests, figures: dict[str, object]) -> None:
    """Step 9: the same app under a standalone supervisord of its own; each trial kills it with SIGKILL once it
    serves in its steady state (compilation finished) and times the way back while a user retries a request.
    supervisord and everything it started are shut down afterwards, and whatever outlived that is named."""
    root = (args.supervisor_dir or Path(tempfile.mkdtemp(prefix="zimage-kill-"))).resolve()
    conf, log_path, port = root / "supervisord.conf", root / "log" / f"{PROGRAM}.log", free_port()
    url = f"http://127.0.0.1:{port}"
    figures.update(supervisor_dir=str(root), log=str(log_path), trials=[])
    try:
        install_supervised(args, root, port, log_path)
        wait_ready(url, args.ready_timeout)
        for number in range(1, args.kill_trials + 1):
            wait_compiled(url, args.compile_timeout)
            figures["trials"].append(kill_trial(conf, url, log_path, fresh.job(args.size, args.steps), args))
            note(f"kill trial {number}: ready {figures['trials'][-1]['ready_s']} s, "
                 f"first image {figures['trials'][-1]['first_image_s']} s")
    finally:
        figures.update(shut_down_supervisor(root))
    for key in ("ready_s", "first_image_s"):
        figures[f"{key}_median"] = round(statistics.median(trial[key] for trial in figures["trials"]), 2)
        figures[f"{key}_max"] = max(trial[key] for trial in figures["trials"])


def install_supervised(args: argparse.Namespace, root: Path, port: int, log_path: Path) -> None:
    command = [sys.executable, "scripts/install_service.py", "--standalone", str(root), "--name", PROGRAM,
               "--python", sys.executable, "--port", str(port), "--log-file", str(log_path),
               "--crash-dir", str(root / "crashes"), "--output-dir", str(root / "outputs"),
               "--startsecs", str(args.startsecs), "--", *args.app_args]
    result = subprocess.run(command, cwd=PROJECT_DIR, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"install_service.py failed:\n{result.stdout}{result.stderr}")


def wait_ready(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not measure_restart.is_ready(url):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the supervised service at {url} was not ready within {timeout_s} s")
        time.sleep(0.5)


def kill_trial(conf: Path, url: str, log_path: Path, job: Job, args: argparse.Namespace) -> dict[str, object]:
    """Seconds from the SIGKILL to /readyz 200 and to the image in the hands of a user who sent `job` right after
    the kill and kept trying; which path served it."""
    killed_pid, killed_at = measure_restart.kill_program(conf, PROGRAM, url, args.ready_timeout)
    with ThreadPoolExecutor(1) as pool:
        user = pool.submit(image_when_back, url, job, killed_at + args.ready_timeout + REQUEST_TIMEOUT_S)
        ready_s = measure_restart.wait_ready_again(conf, PROGRAM, url, killed_pid, killed_at, args.ready_timeout)
        record, received_at = user.result()
    record = with_engine_times([record], log_path)[0]
    return {"killed_pid": killed_pid, "ready_s": round(ready_s, 2), "first_image_s": round(received_at - killed_at, 2),
            "path": record["path"], "request": record, "start": start_phases(log_path)}


def image_when_back(url: str, job: Job, deadline: float) -> tuple[dict[str, object], float]:
    """Send `job` as a user's client does while the service restarts: a refused connection or a 503 is tried again
    after RETRY_AFTER_S. (the image's record, the time.monotonic() it arrived)"""
    while True:
        try:
            return openai_image(url, job), time.monotonic()
        except ServiceRefused as error:
            if error.status != 503:
                raise
        except OSError:  # connection refused or reset: no process listens on the port yet
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"no image from {url} before the deadline after kill -9")
        time.sleep(RETRY_AFTER_S)


def shut_down_supervisor(root: Path, timeout_s: float = 90) -> dict[str, list[int]]:
    """`supervisorctl shutdown` (supervisord stops the service with SIGTERM, as on a host's shutdown), then wait for
    supervisord and everything it started to exit; whatever is alive after `timeout_s` is killed and named in
    "left_running"."""
    pid_file = root / "supervisord.pid"
    try:
        supervisord = psutil.Process(int(pid_file.read_text()))
        # A stale pid file's number may belong to another process by now.
        if str(root / "supervisord.conf") not in supervisord.cmdline():
            return {"supervisor_pids": [], "left_running": []}
        processes = [supervisord, *supervisord.children(recursive=True)]
    except (FileNotFoundError, psutil.NoSuchProcess):  # supervisord never started, or is gone already
        return {"supervisor_pids": [], "left_running": []}
    measure_restart.supervisorctl(root / "supervisord.conf", "shutdown")
    _, alive = psutil.wait_procs(processes, timeout=timeout_s)
    for process in alive:
        process.kill()
    return {"supervisor_pids": [process.pid for process in processes],
            "left_running": [process.pid for process in alive]}


def table(figures: dict[str, object]) -> str:
    """The headline figures, one line each, for what was measured."""
    rows = []
    if "ready_s" in figures:
        rows.append(("start → /readyz 200", f"{figures['ready_s']} s",
                     f"serving {figures['serving_at_ready']}, compiled {figures['compiled_at_ready']}"))
    if "start" in figures:
        rows.append(("  by its log: birth → ready", f"{figures['start']['process_ready_s']} s",
                     f"imports {figures['start']['imports_s']} s, loading {figures['start']['load_s']} s, "
                     f"warm-up {figures['start']['warm_up_s']} s"))
    if "first_request_after_ready_s" in figures:
        rows.append(("first image right at ready", f"{figures['first_request_after_ready_s']} s",
                     f"path {figures['first_request_after_ready_path']}"))
    if "compiled" in figures:
        rows.append(("start → compilation finished", f"{figures['compiled_live_s']} s", figures["compiled"]))
    if "first_request_after_live_s" in figures:
        rows.append(("first image after that", f"{figures['first_request_after_live_s']} s",
                     f"path {figures['first_request_after_live_path']}"))
    for key, label in (("openai", "OpenAI route"), ("gradio", "gradio_client + PNG")):
        if key in figures:
            part = figures[key]
            detail = (f"p95 {part['client_ms_p95']} ms, engine {part['engine_total_ms_median']} ms, "
                      f"overhead {part['overhead_ms_median']} ms")
            if "b64_bytes_median" in part:
                detail += f", b64 {part['b64_bytes_median'] / 2**20:.2f} MiB"
            rows.append((f"{label}, {part['requests']} in a row", f"{part['client_ms_median']} ms", detail))
    if "concurrent" in figures:
        part = figures["concurrent"]
        rows.append((f"{part['clients']} users × {part['per_client']}", f"{part['images_per_s']} img/s",
                     f"p50 {part['latency_s_p50']} s, p95 {part['latency_s_p95']} s, wall {part['wall_s']} s, "
                     f"{part['ok']} ok, errors {part['errors'] or 'none'}"))
    if "mixed" in figures:
        part = figures["mixed"]
        rows.append((f"mixed run, {part['requests']} requests", f"{part['wall_s']} s",
                     f"{len(part['sizes'])} sizes, {part['words_min']}–{part['words_max']} words, "
                     f"slowest {part['client_ms_max']} ms"))
    if "adapters" in figures:
        part = figures["adapters"]
        for name, label in (("none", "no adapter"), ("one", "one adapter"), ("two", "two adapters"),
                            ("switch", "two adapters in turn")):
            rows.append((f"{label}, {part[name]['requests']} in a row", f"{part[name]['client_ms_median']} ms",
                         f"engine {part[name]['engine_total_ms_median']} ms, peak "
                         f"{part['gpu_peak_allocated_mib'].get(name, '-')} MiB"))
        rows.append(("adapter slots written (switch)", f"{part['switch_load_ms_median']} ms", "median"))
    if "edits" in figures:
        part = figures["edits"]
        for name, label in (("image_0.6", "image-to-image at 0.6"), ("inpaint", "inpainting")):
            rows.append((f"{label}, {part[name]['requests']} in a row", f"{part[name]['client_ms_median']} ms",
                         f"engine {part[name]['engine_total_ms_median']} ms, overhead "
                         f"{part[name]['overhead_ms_median']} ms"))
        rows.append(("one image as PNG / JPEG 90 / WebP 90", " / ".join(str(part["bytes"][name]) for name in
                                                                         ("png", "jpeg", "webp")), "bytes"))
    if "uploads" in figures:
        part = figures["uploads"]
        for name, label in (("bomb", "50,000² bomb refused"), ("over_20_mb", "20 MB + 1 upload refused")):
            rows.append((label, f"{part[name]['refused_ms_median']} ms",
                         f"max {part[name]['refused_ms_max']} ms, statuses {part[name]['statuses']}"))
        rows.append(("resident memory before → after", f"{part['rss_mib_before']} → {part['rss_mib_after']} MiB",
                     "the service's processes"))
    if "recompiles_after_live" in figures:
        rows.append(("recompiles after live", str(figures["recompiles_after_live"]),
                     f"recompile-limit hits {figures['recompile_limit_hits']}"))
    if figures.get("engine_kill", {}).get("trials"):
        part = figures["engine_kill"]
        rows.append((f"engine kill -9 → waiting request's image ({len(part['trials'])})",
                     f"{part['first_image_s_median']} s",
                     " ".join(str(trial["first_image_s"]) for trial in part["trials"])))
    if figures.get("kill", {}).get("trials"):
        part = figures["kill"]
        rows.append((f"kill -9 → /readyz 200 ({len(part['trials'])})", f"{part.get('ready_s_median')} s",
                     f"median; max {part.get('ready_s_max')} s"))
        starts = [trial["start"] for trial in part["trials"]]
        # What the log's account leaves out: from the kill to the new process's birth (supervisord's restart).
        rows.append(("  kill → new process born (≈)", " ".join(
            str(round(trial["ready_s"] - trial["start"]["process_ready_s"], 2))
            if trial["start"]["process_ready_s"] is not None else "None" for trial in part["trials"]), "s"))
        rows.append(("  by its log: birth → ready", " ".join(str(start["process_ready_s"]) for start in starts),
                     "; ".join(f"{share} " + " ".join(str(start[f"{key}_s"]) for start in starts) + " s"
                               for share, key in (("imports", "imports"), ("loading", "load"),
                                                  ("warm-up", "warm_up")))))
        rows.append(("kill -9 → first image", f"{part.get('first_image_s_median')} s",
                     f"median; max {part.get('first_image_s_max')} s; paths "
                     f"{sorted({str(trial['path']) for trial in part['trials']})}"))
    return "\n".join(f"{what:<34} {figure:>12}  {detail}" for what, figure, detail in rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--size", default="1024x1024", help="WxH of the requests of steps 2–7 and 9")
    parser.add_argument("--steps", type=int, default=8, help="steps of those requests")
    parser.add_argument("--requests", type=int, default=8, help="requests in a row, through each API")
    parser.add_argument("--concurrent-clients", type=int, default=4, help="users sending at once")
    parser.add_argument("--per-client", type=int, default=3, help="requests each of those users sends")
    parser.add_argument("--mixed", type=int, default=30, help="requests of the mixed run (0: skip it)")
    parser.add_argument("--mixed-sizes", type=lambda text: text.split(","), default=",".join(MIXED_SIZES),
                        help="comma-separated WxH sizes the mixed run cycles through")
    parser.add_argument("--mixed-steps", type=int, default=2, help="steps of the mixed run's requests")
    parser.add_argument("--adapters", type=lambda text: text.split(","), default=[],
                        help="A,B,C: three LoRA adapters of the service's folder (A and B of one rank), for runs with "
                        "none, A, A and C, A and B in turn, and a mixed run (none given: no adapter runs)")
    parser.add_argument("--edits", action="store_true",
                        help="measure image-to-image (strength 0.6) and inpainting through /v1/images/edits, a mixed "
                        "run with text-to-image, and one image's bytes as PNG, JPEG 90 and WebP 90")
    parser.add_argument("--upload-trials", type=int, default=0,
                        help="send this many decompression bombs and as many uploads over 20 MB to the edit route: "
                        "how long each takes to be refused, the service's memory before and after (0: none)")
    parser.add_argument("--kill-trials", type=int, default=0, help="kill -9 trials under supervisord (0: none)")
    parser.add_argument("--engine-kill-trials", type=int, default=0,
                        help="kill -9 of the engine process with a request running and one waiting (0: none)")
    parser.add_argument("--startsecs", type=int, default=DEFAULT_STARTSECS,
                        help="supervisor's startsecs for the kill trials; a kill comes only after it")
    parser.add_argument("--supervisor-dir", type=Path,
                        help="the kill trials' supervisord, logs and images (default: a new temporary directory, "
                        "kept for its logs)")
    parser.add_argument("--ready-timeout", type=float, default=READY_TIMEOUT_S, help="seconds to wait for ready")
    parser.add_argument("--compile-timeout", type=float, default=COMPILE_TIMEOUT_S,
                        help="seconds to wait for compilation to finish")
    parser.add_argument("--log", type=Path, default=Path("measure_service.log"), help="the service's log")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("app_args", nargs="*", help="after --: arguments for app.py")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("requests", "concurrent_clients", "per_client"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.adapters and len(args.adapters) != 3:
        parser.error("--adapters takes three names, A,B,C")
    fresh = FreshRequests()
    figures: dict[str, object] = {"app_args": args.app_args, "size": args.size, "steps": args.steps,
                                  "log": str(args.log)}
    exit_code = 0
    try:
        measure_service(args, fresh, figures)
        if args.kill_trials:
            measure_kill_trials(args, fresh, figures.setdefault("kill", {}))
    except Exception as error:  # keep what was measured: a full run on the GPU takes many minutes
        traceback.print_exc()
        figures["error"] = f"{type(error).__name__}: {error}"
        exit_code = 1
    print(table(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
