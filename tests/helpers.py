"""What several test modules use: the project's paths, free ports, a real `app.py` process and its probes, a CPU
engine on the tiny model, Prometheus samples, the supervisor event listeners as modules, and a DiT attention layer's
inputs and compiled graph."""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

import torch
from prometheus_client.parser import text_string_to_metric_families

import app
from config import load_settings
from pipeline.engine import Engine, EngineOptions
from pipeline.faults import FaultPlan
from pipeline.layouts import LayoutKind

PROJECT_DIR = Path(__file__).resolve().parent.parent
ARTIFACTS_DIR = PROJECT_DIR / "test-artifacts"

START_TIMEOUT_S = 180
POLL_S = 0.05

SMALL = dict(width=128, height=128, steps=3)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll `condition` until it holds; fail naming `what` once `timeout_s` has passed without it."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} after {timeout_s} s")
        time.sleep(POLL_S)


@dataclass
class RunningApp:
    url: str
    output_dir: Path
    log_path: Path
    process: subprocess.Popen

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


# The tests' own self-signed certificate names no host: check the server, not the certificate.
UNVERIFIED_TLS = ssl._create_unverified_context()


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5, context=UNVERIFIED_TLS) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def generate_over_http(url: str, prompt: str, size: str = "64x64", steps: int = 2, **extensions) -> dict:
    """One image through the OpenAI route, as b64_json: the parsed answer. `extensions`: the service's own fields
    (seed, loras, ...)."""
    body = json.dumps({"prompt": prompt, "size": size, "steps": steps, "response_format": "b64_json",
                       **extensions}).encode()
    request = urllib.request.Request(f"{url}/v1/images/generations", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def connect(app: RunningApp, timeout: float = 30) -> socket.socket:
    """A raw connection to the app: what these tests send (framing, headers a client library sets or refuses)
    must reach the server byte for byte."""
    address = urlsplit(app.url)
    return socket.create_connection((address.hostname, address.port), timeout=timeout)


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (names lower-cased) and body of the one response on a connection whose request said
    Connection: close."""
    head, _, body = read_until_closed(sock).partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value for name, value in (line.split(": ", 1) for line in header_lines)}
    return int(status_line.split()[1]), headers, body


def raw_exchange(app: RunningApp, request: bytes, timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    """Send `request` (which says Connection: close) on a new connection; the response, as read_response gives it."""
    with connect(app, timeout) as sock:
        sock.sendall(request)
        return read_response(sock)


def multipart_body(fields: dict[str, str], files: list[tuple[str, str, bytes]],
                   boundary: str = "zimage-test-boundary") -> tuple[bytes, str]:
    """A multipart/form-data body of text `fields` and `files` (field name, file name, bytes), and its
    Content-Type, written out here so that a test controls every byte a client library would choose."""
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
             for name, value in fields.items()]
    parts += [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
              f'Content-Type: application/octet-stream\r\n\r\n'.encode() + data + b"\r\n"
              for name, filename, data in files]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def post_request(path: str, body: bytes, content_type: str, *headers: str) -> bytes:
    """A POST of `body` to `path` as raw bytes, for raw_exchange; `headers`: more lines, such as "Origin: ..."."""
    head = "".join(f"{line}\r\n" for line in headers)
    return (f"POST {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n{head}\r\n").encode() + body


def get_request(path: str) -> bytes:
    """A GET of `path` as raw bytes, for raw_exchange."""
    return f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()


def page_events(app: RunningApp) -> list[dict]:
    """The page's events as Gradio's config lists them; an event's index there is its fn_index. Asked for as a
    client that honours Retry-After would: a test before may have spent the page loads' budget (webui.limits)."""
    answers = []

    def loaded() -> bool:
        answers.append(raw_exchange(app, get_request("/config")))
        return answers[-1][0] != 429

    wait_until(loaded, 10, "the page's config served")
    return json.loads(answers[-1][2])["dependencies"]


def fn_index_of(app: RunningApp, api_name: str) -> int:
    return next(index for index, event in enumerate(page_events(app)) if event["api_name"] == api_name)


def post_json(app: RunningApp, path: str, body: object) -> tuple[int, bytes]:
    """POST `body` as JSON on a new connection: the status and the answer's body."""
    payload = json.dumps(body).encode()
    status, _, answer = raw_exchange(app, f"POST {path} HTTP/1.1\r\nHost: localhost\r\n"
                                          f"Content-Type: application/json\r\nConnection: close\r\n"
                                          f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return status, answer


def start_app(tmp_path: Path, *flags: str, env: dict[str, str] | None = None, open_files: int | None = None,
              own_process_group: bool = False, engine_process: bool = False) -> RunningApp:
    """`open_files`: the soft limit on open files the process starts with (as a supervisord or shell may leave it).
    `own_process_group`: the app leads a process group of its own, as under supervisord, so that a test can signal
    the whole group as `supervisorctl stop` does (stopasgroup). `engine_process`: the engine in its own process, as
    the service runs by default; off, it runs in the app's process (--no-engine-process), for the many tests of the
    web side, which is the same either way: an engine process and its standby cost each start seconds of a CI
    machine's two cores."""
    if not engine_process and not {"--engine-process", "--no-engine-process"} & set(flags):
        flags = (*flags, "--no-engine-process")
    port = free_port()
    output_dir = tmp_path / "outputs"
    log_path = tmp_path / "app.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "app.py", "--port", str(port), "--output-dir", str(output_dir), *flags],
            cwd=PROJECT_DIR, stdout=log, stderr=subprocess.STDOUT, env=env,
            process_group=0 if own_process_group else None,
            preexec_fn=None if open_files is None else lambda: resource.setrlimit(
                resource.RLIMIT_NOFILE, (open_files, resource.getrlimit(resource.RLIMIT_NOFILE)[1])),
        )
    scheme = "https" if "--ssl-certfile" in flags else "http"
    app = RunningApp(f"{scheme}://127.0.0.1:{port}", output_dir, log_path, process)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"app exited with {process.returncode}:\n{app.log()}")
        try:
            # /readyz can answer a moment before the "ready" line reaches the log; wait for both.
            if http_status(f"{app.url}/readyz") == 200 and "ready url=" in app.log():
                return app
        except OSError:
            pass
        time.sleep(POLL_S)
    process.kill()
    raise AssertionError(f"app not ready in {START_TIMEOUT_S}s:\n{app.log()}")


ADAPTER_STD = 0.2  # random adapters' weights: large enough to change the tiny model's image plainly


def demo_model_with_adapters(root: Path, tiny_models, *names: str) -> Path:
    """A copy of the tiny model where start_demo_app(root, ...) serves it from, with a random LoRA adapter for each
    of `names` (rank 4, seeded by its position, key formats taken in turn) in its adapter folder."""
    from pipeline.random_adapters import KeyFormat, write_random_adapter

    demo_dir = root / "demo-model"
    shutil.copytree(tiny_models[LayoutKind.SINGLE_FILE], demo_dir)
    (demo_dir / "loras").mkdir()
    formats = list(KeyFormat)
    for number, name in enumerate(names):
        write_random_adapter(demo_dir / "loras" / f"{name}.safetensors", formats[number % len(formats)], rank=4,
                             seed=number + 1, std=ADAPTER_STD)
    return demo_dir


def start_demo_app(tmp_path: Path, tiny_models, *flags: str, env: dict[str, str] | None = None,
                   open_files: int | None = None, own_process_group: bool = False,
                   engine_process: bool = False) -> RunningApp:
    """`app.py --demo` on a copy of the session's tiny model (no rebuild)."""
    demo_dir = tmp_path / "demo-model"
    if not demo_dir.exists():
        shutil.copytree(tiny_models[LayoutKind.SINGLE_FILE], demo_dir)
    return start_app(tmp_path, "--demo", "--demo-dir", str(demo_dir), *flags, env=env, open_files=open_files,
                     own_process_group=own_process_group, engine_process=engine_process)


def stop_app(app: RunningApp) -> None:
    app.process.terminate()
    try:
        app.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        app.process.kill()


def wait_until_busy(app: RunningApp, timeout_s: float = 30) -> None:
    """Until a request is on the "GPU", as /readyz reports it."""

    def busy() -> bool:
        with urllib.request.urlopen(f"{app.url}/readyz", timeout=5, context=UNVERIFIED_TLS) as response:
            return json.loads(response.read())["busy"]

    wait_until(busy, timeout_s, "busy")


def wait_until_queued(app: RunningApp, waiting: int, timeout_s: float = 30) -> None:
    """Until `waiting` requests wait in Gradio's queue, as /metrics reports it (an app without --auth)."""

    def queued() -> bool:
        with urllib.request.urlopen(f"{app.url}/metrics", timeout=5, context=UNVERIFIED_TLS) as response:
            return parse_samples(response.read().decode())[("zimage_queue_depth", ())] == waiting

    wait_until(queued, timeout_s, f"{waiting} waiting in the queue")


def fill_the_queue(app: RunningApp, send: Callable[[str], None], timeout_s: float) -> None:
    """Three callers of `send(name)` against a queue of one place: "running" (on the GPU), "waiting" (in the place)
    and "one too many", each started once the one before holds its spot; returns when all three have finished."""
    callers = []
    for name, holding in (("running", wait_until_busy), ("waiting", lambda app: wait_until_queued(app, 1)),
                          ("one too many", None)):
        caller = threading.Thread(target=send, args=(name,))
        caller.start()
        callers.append(caller)
        if holding is not None:
            holding(app)
    for caller in callers:
        caller.join(timeout=timeout_s)


def parse_samples(text: str) -> dict[tuple[str, tuple], float]:
    """Prometheus text → {(sample name, sorted labels): value}, by prometheus_client's own parser."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


ENGINE_KEYWORDS = ("on_fatal", "metrics", "compile_backend")  # Engine's own arguments; the rest are options


def engine_options(output_dir: Path, **overrides) -> EngineOptions:
    """The engine options app.py builds from config/defaults.toml, for the tiny model on the CPU: sizes up to 1024,
    SDPA attention, `output_dir`, and the test's overrides."""
    settings = load_settings(["--max-w", "1024", "--max-h", "1024", "--attention", "sdpa"], environ={})
    return replace(app.engine_options(settings, "tiny test model", on_gpu=False), output_dir=output_dir, **overrides)


def engine_with(loaded_tiny, tmp_path, fault=None, **overrides):
    keywords = {name: overrides.pop(name) for name in ENGINE_KEYWORDS if name in overrides}
    return Engine(loaded_tiny, engine_options(tmp_path / "outputs", **overrides), faults=fault or FaultPlan(),
                  **keywords)


def load_listener(name: str):
    """A supervisor event listener (a program in deploy/supervisor/, not a package) as a module."""
    path = PROJECT_DIR / "deploy" / "supervisor" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"listener_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def rotary_attention_inputs(transformer, tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states (float32) and the DiT's own rotary factors (complex64) for `tokens` positions on a 2-D grid,
    on the transformer's device."""
    device = next(transformer.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, tokens, transformer.config.dim, generator=generator)
    positions = torch.stack([torch.zeros(tokens, dtype=torch.long), torch.arange(tokens) // 8,
                             torch.arange(tokens) % 8], dim=1)
    return hidden.to(device), transformer.rope_embedder(positions.to(device)).unsqueeze(0)


def compiled_graph_ops(attention, processor, hidden, freqs_cis) -> tuple[set, torch.Tensor]:
    """The functions Dynamo's graph calls when compiling `processor` on `attention` (dynamic shapes, one graph),
    and the compiled output."""
    seen: set = set()

    def recording_inductor(graph, example_inputs):
        seen.update(node.target for node in graph.graph.nodes if node.op == "call_function")
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(graph, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(lambda h, f: processor(attention, h, freqs_cis=f), backend=recording_inductor,
                             fullgraph=True, dynamic=True)
    with torch.inference_mode():
        output = compiled(hidden, freqs_cis)
    return seen, output


def assert_holds_the_built_weights(pipe, names=("transformer", "text_encoder", "vae")) -> None:
    """Each named component of `pipe` holds exactly the weights random_model builds for the tiny model (in float32,
    as the CPU computes)."""
    from pipeline.random_model import build_components

    built = build_components()
    for name in names:
        ours, theirs = getattr(pipe, name).state_dict(), built[name].state_dict()
        assert ours.keys() == theirs.keys()
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key].float(), rtol=0, atol=0, msg=f"{name}.{key}")


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def hand_made_png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes, *extra: bytes) -> bytes:
    """A PNG written chunk by chunk, for what Pillow will not write (16-bit RGB, a lying header); `rows` are the
    scanlines, each with its filter byte. `extra` chunks go between IHDR and IDAT."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (PNG_SIGNATURE + chunk(b"IHDR", header) + b"".join(extra) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def bomb(width: int = 50_000, height: int = 50_000) -> bytes:
    """A real, valid-looking PNG of well under a kilobyte whose header claims width × height RGB pixels."""
    return hand_made_png(width, height, 8, 2, b"\0" * 1000)
