"""Load test: N concurrent gradio_client clients, M requests each, against a service on this machine.

    .venv/bin/python scripts/loadtest.py --url http://127.0.0.1:7860 --clients 4 --requests 50 --size 256

First times single requests alone (median of --single-runs), then runs the clients together; prints throughput,
p50/p95 latency, errors by kind, and how close the queue keeps the GPU to fully busy:
efficiency = throughput / (1 / single-request latency), which should be >= 0.95. Loopback addresses only.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import threading
import time
import urllib.parse
from pathlib import Path

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
MAX_TOTAL_REQUESTS = 2000  # a load test here must end by itself


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def error_kind(error: Exception) -> str:
    words = " ".join(str(error).split()[:6])
    return f"{type(error).__name__}: {words}" if words else type(error).__name__


def one_request(client, args, seed: int) -> float:
    started = time.perf_counter()
    client.predict(f"load test image {seed}, a lighthouse at dusk", f"{args.size}x{args.size}", seed, False,
                   args.steps, 3.0, api_name="/generate")
    return time.perf_counter() - started


def run(args) -> dict[str, object]:
    from gradio_client import Client

    single_client = Client(args.url, verbose=False)
    one_request(single_client, args, seed=0)  # warm-up
    single = statistics.median(one_request(single_client, args, seed=i) for i in range(1, args.single_runs + 1))

    latencies: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()

    def client_loop(client_number: int) -> None:
        client = Client(args.url, verbose=False)
        for request_number in range(args.requests):
            seed = 1000 * (client_number + 1) + request_number
            try:
                latency = one_request(client, args, seed)
            except Exception as error:
                with lock:
                    errors[error_kind(error)] += 1
                continue
            with lock:
                latencies.append(latency)

    started = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(n,)) for n in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    throughput = len(latencies) / wall
    return {
        "url": args.url, "clients": args.clients, "requests_per_client": args.requests, "size": args.size,
        "steps": args.steps, "ok": len(latencies), "errors": dict(errors), "wall_s": round(wall, 2),
        "throughput_per_s": round(throughput, 3), "single_request_s": round(single, 3),
        "p50_s": round(percentile(latencies, 0.5), 3) if latencies else None,
        "p95_s": round(percentile(latencies, 0.95), 3) if latencies else None,
        "efficiency": round(throughput * single, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:7860")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=50, help="requests per client")
    parser.add_argument("--size", type=int, default=1024, help="image width and height")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--single-runs", type=int, default=3, help="lone requests timed before the load")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    host = urllib.parse.urlparse(args.url).hostname
    if host not in LOOPBACK_HOSTS:
        parser.error(f"--url must point at this machine's loopback (got host {host!r})")
    if args.clients * args.requests > MAX_TOTAL_REQUESTS:
        parser.error(f"at most {MAX_TOTAL_REQUESTS} requests in one run")
    figures = run(args)
    for key, value in figures.items():
        print(f"{key:>20}  {value}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if not figures["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
