"""Measure how fast the supervised service comes back after kill -9: SIGKILL → supervisor restarts it → /readyz 200.

    .venv/bin/python scripts/measure_restart.py --supervisor-conf /etc/supervisor/supervisord.conf --trials 10

Prints each trial and min / median / max in seconds (and JSON with --json).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from install_service import supervisor_binary


def supervisorctl(conf: Path | None, *command: str) -> str:
    binary = supervisor_binary("supervisorctl", Path(sys.executable), standalone=True)
    args = [binary, *(["-c", str(conf)] if conf else []), *command]
    return subprocess.run(args, capture_output=True, text=True).stdout.strip()


def is_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def current_pid(conf: Path | None, program: str) -> int:
    answer = supervisorctl(conf, "pid", program)
    return int(answer) if answer.isdigit() else 0


def wait_running(conf: Path | None, program: str, timeout_s: float) -> None:
    """Until supervisor counts the process as started (startsecs passed): a kill before that would be a failed
    start, which supervisor retries only startretries times, not a crash of a running service."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = supervisorctl(conf, "status", program).split()
        if len(status) > 1 and status[1] == "RUNNING":
            return
        time.sleep(0.5)
    raise RuntimeError(f"{program} did not reach RUNNING within {timeout_s} s")


def kill_program(conf: Path | None, program: str, url: str, timeout_s: float) -> tuple[int, float]:
    """SIGKILL the running, ready program: (the pid killed, the time.monotonic() of the kill)."""
    wait_running(conf, program, timeout_s)
    old_pid = current_pid(conf, program)
    if not old_pid or not is_ready(url):
        raise RuntimeError(f"{program} is not running and ready before the trial")
    os.kill(old_pid, signal.SIGKILL)
    return old_pid, time.monotonic()


def wait_ready_again(conf: Path | None, program: str, url: str, old_pid: int, killed_at: float,
                     timeout_s: float) -> float:
    """Seconds from the kill until /readyz answered 200 from a new process. The clock stops at that answer, not
    after the slower pid check (a supervisorctl process) that confirms it."""
    while time.monotonic() - killed_at < timeout_s:
        if is_ready(url):
            answered = time.monotonic()
            if current_pid(conf, program) not in (0, old_pid):
                return answered - killed_at
        time.sleep(0.1)
    raise RuntimeError(f"{program} was not ready again {timeout_s} s after kill -9")


def kill_and_time(conf: Path | None, program: str, url: str, timeout_s: float) -> tuple[float, int]:
    """(seconds from SIGKILL to ready again, the pid killed)"""
    old_pid, killed_at = kill_program(conf, program, url, timeout_s)
    return wait_ready_again(conf, program, url, old_pid, killed_at, timeout_s), old_pid


def measure(conf: Path | None, program: str, url: str, trials: int, timeout_s: float = 300) -> dict[str, object]:
    times, killed_pids = [], []
    for trial in range(1, trials + 1):
        seconds, pid = kill_and_time(conf, program, url, timeout_s)
        times.append(seconds)
        killed_pids.append(pid)
        print(f"trial {trial}: killed pid {pid}, ready again after {seconds:.2f} s", flush=True)
    return {"trials": trials, "seconds": [round(t, 2) for t in times], "killed_pids": killed_pids,
            "min_s": round(min(times), 2),
            "median_s": round(statistics.median(times), 2), "max_s": round(max(times), 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--supervisor-conf", type=Path, help="supervisord.conf for supervisorctl -c")
    parser.add_argument("--program", default="z-image-turbo")
    parser.add_argument("--url", default="http://127.0.0.1:7860")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    figures = measure(args.supervisor_conf, args.program, args.url, args.trials)
    print(f"restart-to-ready after kill -9 over {args.trials} trials: min {figures['min_s']} s, "
          f"median {figures['median_s']} s, max {figures['max_s']} s")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
