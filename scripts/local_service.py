"""For the measuring scripts: start app.py as a process on a free loopback port and wait until /readyz answers 200;
read the engine's request lines back from its log; report figures."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent
# The engine's line for each saved image (pipeline/engine.py): `request id=… prompt=… size=WxH steps=… seed=… …
# total_ms=… [gpu_peak_…] [path=eager|compiled] outcome=ok file=…`. The prompt summary may hold any text, so only
# what follows its ` size=` is read as fields: key=value pairs without spaces, whichever the engine writes.
REQUEST_LINE = re.compile(r"request id=(?P<id>\S+) prompt=.* size=(?P<size>\d+x\d+) (?P<fields>steps=.*?) "
                          r"outcome=ok ")
FIELD = re.compile(r"(\w+)=(\S+)")


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
        stop_service(service)
    report(figures, json_path)
    return 0


def stop_service(process: subprocess.Popen, timeout_s: float = 120) -> None:
    """SIGTERM, as supervisor stops it, and wait; kill it if it overstays."""
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def logged_requests(log_path: Path) -> dict[int, dict[str, int | str]]:
    """The log's saved images by seed: request id, size and every field after it (whole numbers as int). A seed
    logged twice gives its latest line."""
    found = {}
    for match in REQUEST_LINE.finditer(log_path.read_text(errors="replace")):
        fields = {key: int(value) if value.isdigit() else value for key, value in FIELD.findall(match["fields"])}
        found[fields["seed"]] = {"id": match["id"], "size": match["size"], **fields}
    return found


def report(figures: dict[str, object], json_path: Path | None) -> None:
    """Print the figures as JSON, and write them to `json_path` when one is given."""
    text = json.dumps(figures, indent=2)
    print(text)
    if json_path:
        json_path.write_text(text + "\n")
