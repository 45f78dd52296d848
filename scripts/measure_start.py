"""Process start → /readyz 200 → compiled path live, then HTTP round trips through the UI's API vs. the pipeline.

    python scripts/measure_start.py --runs 5 --size 1024x1024 --log start.log -- --model-dir /data/random-full

Everything after `--` goes to app.py. The round trip is gradio_client's predict() (join the queue, wait, receive the
result) plus downloading the new PNG; the pipeline time is the engine's own total for the same request (encode →
PNG saved), read from the service's log. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from local_service import logged_requests, measure_and_report  # noqa: E402

READY_TIMEOUT_S = 600
COMPILE_TIMEOUT_S = 600
PROMPT = "a lighthouse on a cliff at dusk, waves, photo"


def compiled_state(url: str) -> str:
    with urllib.request.urlopen(f"{url}/readyz", timeout=5) as response:
        return json.load(response)["compiled"]


def wait_compiled(url: str, timeout_s: float = COMPILE_TIMEOUT_S) -> str:
    """The compiled state once compilation has finished ("on", "failed", or "off" when it never ran); "still
    compiling" if it has not after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = compiled_state(url)
        if state not in ("pending", "compiling"):
            return state
        time.sleep(0.2)
    return "still compiling"


def round_trip(client, prompt: str, size: str, seed: int, steps: int = 8) -> float:
    """Milliseconds for one image through the UI's API, as a browser gets it: predict() (join the queue, wait,
    receive the result) and the new PNG's download. `client`: a gradio_client Client made with
    download_files=False, since it would otherwise download the whole session gallery after each image, where a
    browser has the older ones cached."""
    started = time.perf_counter()
    *_, png = client.predict(prompt, size, seed, False, steps, 3.0, api_name="/generate")
    with urllib.request.urlopen(png["url"], timeout=30) as response:
        response.read()
    return (time.perf_counter() - started) * 1000


def round_trips(url: str, size: str, runs: int) -> dict[int, float]:
    from gradio_client import Client

    client = Client(url, verbose=False, download_files=False)
    # The first is a warm-up: the client's and the server's first call.
    times = {seed: round_trip(client, PROMPT, size, seed) for seed in range(1000, 1001 + runs)}
    times.pop(1000)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed round trips after one warm-up (default: 5)")
    parser.add_argument("--size", default="1024x1024", help="WxH of each request (default: 1024x1024)")
    parser.add_argument("--log", type=Path, default=Path("measure_start.log"), help="the service's log")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("app_args", nargs="*", help="after --: arguments for app.py")
    args = parser.parse_args(argv)

    def compile_and_round_trips(url: str, started: float) -> dict[str, object]:
        figures = {"compiled": wait_compiled(url), "start_to_compiled_s": round(time.monotonic() - started, 2)}
        trips = round_trips(url, args.size, args.runs)
        logged = logged_requests(args.log)
        pipeline_ms = [logged[seed]["total_ms"] for seed in trips]
        trip_ms = list(trips.values())
        return figures | {
            "size": args.size, "runs": args.runs,
            "round_trip_ms_median": round(statistics.median(trip_ms), 1),
            "pipeline_total_ms_median": statistics.median(pipeline_ms),
            "pipeline_without_save_ms_median": statistics.median(logged[s]["total_ms"] - logged[s]["save_ms"]
                                                                 for s in trips),
            "round_trip_over_pipeline": round(statistics.median(
                trip / pipe for trip, pipe in zip(trip_ms, pipeline_ms, strict=True)), 3),
            "peak_reserved_gib": round(max(entry.get("gpu_peak_reserved_mib", 0) for entry in logged.values())
                                       / 1024, 2),
            "peak_allocated_gib": round(max(entry.get("gpu_peak_allocated_mib", 0) for entry in logged.values())
                                        / 1024, 2),
        }

    return measure_and_report(args.app_args, args.log, compile_and_round_trips, timeout_s=READY_TIMEOUT_S,
                              json_path=args.json)

if __name__ == "__main__":
    sys.exit(main())
