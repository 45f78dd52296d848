"""Start app.py as a process on a free loopback port and wait until /readyz answers 200 (for the measuring scripts)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_service(app_args: list[str], log_path: Path, env: dict[str, str] | None = None,
                  timeout_s: float = 180) -> tuple[subprocess.Popen, str]:
    """(the process, its base URL) once ready; RuntimeError if it exits or is not ready within `timeout_s`."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with log_path.open("w") as log:
        process = subprocess.Popen([sys.executable, "app.py", "--port", str(port), *app_args], cwd=PROJECT_DIR,
                                   stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"service exited with {process.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
                if response.status == 200:
                    return process, url
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"service not ready in {timeout_s:.0f} s; see {log_path}")


def measure_and_report(app_args: list[str], log_path: Path, measure: Callable[[str, float], dict[str, object]],
                    timeout_s: float, json_path: Path | None) -> int:
    """Start the service, time process start → /readyz 200, add `measure(url, started)`'s figures (`started` is the
    time.monotonic() of the start), stop it and report the figures; the exit code for the script. 1, with the reason
    on stderr, if it never became ready."""
    started = time.monotonic()
    try:
        service, url = start_service(app_args, log_path, timeout_s=timeout_s)
    except RuntimeError as error:
        print(error, file=sys.stderr)
        return 1
    try:
        figures = {"start_to_ready_s": round(time.monotonic() - started, 2), **measure(url, started)}
    finally:
        service.terminate()
        service.wait(timeout=120)
    report(figures, json_path)
    return 0


def report(figures: dict[str, object], json_path: Path | None) -> None:
    """Print the figures as JSON, and write them to `json_path` when one is given."""
    text = json.dumps(figures, indent=2)
    print(text)
    if json_path:
        json_path.write_text(text + "\n")
