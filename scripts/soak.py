"""Soak and fault-mix runs: start the service (tiny demo model) on a free loopback port, send it N requests, and
watch its resident memory and open file descriptors; count outcomes and the images on disk.

    .venv/bin/python scripts/soak.py --requests 500                       # soak: memory and fds stay flat?
    .venv/bin/python scripts/soak.py --requests 200 --fault oom@1/10      # every 10th request runs out of memory

Prints the figures as JSON (and writes them with --json). Exit 0 when no process exit happened and, with
--fault, the errors are exactly the injected ones.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadtest import error_kind  # noqa: E402
from local_service import PROJECT_DIR, start_service  # noqa: E402

WARM_UP_REQUESTS = 20  # memory settles (allocator pools, caches) over the first requests; growth is counted after


def sample(process: psutil.Process) -> tuple[int, int]:
    return process.memory_info().rss, process.num_fds()


def run(args, workdir: Path) -> dict[str, object]:
    from gradio_client import Client

    app_args = ["--demo", "--output-dir", str(workdir / "outputs"), "--crash-dir", str(workdir / "crashes"),
                "--demo-dir", str(PROJECT_DIR / ".cache" / "demo-model")]
    fault_env = {"ZIMAGE_TEST_MODE": "1", "ZIMAGE_FAULT": args.fault} if args.fault else None
    service, url = start_service(app_args, workdir / "service.log", fault_env)
    watched = psutil.Process(service.pid)
    # The service is what is watched here: results stay on the server instead of being downloaded each time.
    client = Client(url, verbose=False, download_files=False)
    outcomes: collections.Counter[str] = collections.Counter()
    samples = []
    started = time.perf_counter()
    try:
        for number in range(args.requests):
            try:
                client.predict(f"soak request {number}, a harbour at dawn", f"{args.size}x{args.size}", number,
                               False, args.steps, 3.0, api_name="/generate")
                outcomes["ok"] += 1
            except Exception as error:
                outcomes[error_kind(error)] += 1
            if service.poll() is not None:
                break
            if number + 1 == WARM_UP_REQUESTS or (number + 1) % 50 == 0 or number + 1 == args.requests:
                samples.append((number + 1, *sample(watched)))
    finally:
        exits = 0 if service.poll() is None else 1
        service.terminate()
        service.wait(timeout=60)
    baseline = next((s for s in samples if s[0] >= WARM_UP_REQUESTS), samples[0])
    final = samples[-1]
    return {
        "requests": args.requests, "size": args.size, "steps": args.steps, "fault": args.fault,
        "wall_s": round(time.perf_counter() - started, 1), "outcomes": dict(outcomes), "process_exits": exits,
        "images_on_disk": len(list((workdir / "outputs").rglob("*.png"))),
        "rss_mib_after_warm_up": round(baseline[1] / 2**20, 1), "rss_mib_final": round(final[1] / 2**20, 1),
        "rss_growth_pct": round(100 * (final[1] - baseline[1]) / baseline[1], 2),
        "fds_after_warm_up": baseline[2], "fds_final": final[2],
        "samples": [{"after_requests": n, "rss_mib": round(rss / 2**20, 1), "fds": fds} for n, rss, fds in samples],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--size", type=int, default=256, help="image width and height")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--fault", help="a test fault for the service, e.g. oom@1/10 (see pipeline/faults.py)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if not 1 <= args.requests <= 5000:
        parser.error("--requests must be between 1 and 5000")
    with tempfile.TemporaryDirectory(prefix="zimage-soak-") as workdir:
        figures = run(args, Path(workdir))
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if figures["process_exits"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
