"""Start the service as a real process, time process start → /readyz 200, then load it (scripts/loadtest.py).

    python scripts/serve_and_load.py --clients 4 --requests 20 --size 1024 -- --model-dir /data/random-full

Everything after `--` goes to app.py. Prints the start-to-ready time and the load figures as JSON.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadtest  # noqa: E402
from local_service import measure_and_report  # noqa: E402

# The real weights from a cold page cache take longer than the tiny model to come up.
READY_TIMEOUT_S = 600


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=20, help="requests per client")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--single-runs", type=int, default=3)
    parser.add_argument("--log", type=Path, default=Path("serve_and_load.log"), help="the service's log")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("app_args", nargs="*", help="after --: arguments for app.py")
    args = parser.parse_args(argv)

    def load(url: str, _started: float) -> dict[str, object]:
        return loadtest.run(argparse.Namespace(url=url, clients=args.clients, requests=args.requests, size=args.size,
                                               steps=args.steps, single_runs=args.single_runs))

    return measure_and_report(args.app_args, args.log, load, timeout_s=READY_TIMEOUT_S, json_path=args.json)

if __name__ == "__main__":
    sys.exit(main())
