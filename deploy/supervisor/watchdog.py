"""Supervisor event listener: restart the service when it stops answering, or when GPU memory stays low while idle.

On every TICK event it probes the service's /healthz with a timeout. A hung CUDA call (or any freeze) leaves the
process alive, so supervisor alone never notices; after --failures failed probes in a row this restarts the program
through supervisor's XML-RPC. Failures are not counted while the service is still loading (until it was seen
healthy once, or --startup-grace seconds passed). With --min-free-gpu-mib, free GPU memory (reported by /readyz)
under that mark for --low-memory-ticks ticks in a row also restarts it — but only while no job is running; a
service whose engine runs in its own process (/readyz: "engine_process") is sent SIGUSR2 instead, and replaces only
that process once no job waits or runs.

Streams, the RPC proxy and the HTTP probe are parameters so the logic can be driven in tests (as superlance's
httpok does).
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from supervisor import childutils

Probe = Callable[[str, float], "tuple[bool, dict]"]


# The probe goes to the service's loopback address, which a TLS certificate (made for the public name) never names:
# the certificate is not what a liveness probe checks.
UNVERIFIED_TLS = ssl._create_unverified_context()


def http_probe(url: str, timeout: float) -> tuple[bool, dict]:
    """(answered 2xx, JSON body or {})."""
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=UNVERIFIED_TLS) as response:
            return 200 <= response.status < 300, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        return False, json.loads(error.read() or b"{}") if error.headers.get_content_type() == "application/json" \
            else {}
    except (OSError, ValueError):
        return False, {}


def log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} watchdog {message}", file=sys.stderr, flush=True)


class Watchdog:
    def __init__(self, rpc, program: str, url: str, *, timeout: float, failures: int, startup_grace: float,
                 min_free_gpu_mib: int, low_memory_ticks: int, probe: Probe = http_probe) -> None:
        self.rpc = rpc
        self.program = program
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.max_failures = failures
        self.startup_grace = startup_grace
        self.min_free_gpu_mib = min_free_gpu_mib
        self.low_memory_ticks = low_memory_ticks
        self.probe = probe
        self._pid = None
        self._seen_healthy = False
        self._failures = 0
        self._low_memory = 0

    def tick(self) -> None:
        info = self.rpc.supervisor.getProcessInfo(self.program)
        if info["statename"] != "RUNNING":
            self._pid = None
            return
        if info["pid"] != self._pid:  # a new process: start counting afresh
            self._pid, self._seen_healthy, self._failures, self._low_memory = info["pid"], False, 0, 0
        healthy, _ = self.probe(f"{self.url}/healthz", self.timeout)
        if healthy:
            if not self._seen_healthy:  # from now on a failed probe counts, start-up grace or not
                log(f"program={self.program} pid={self._pid} healthz=ok watching")
            self._seen_healthy = True
            self._failures = 0
            self._check_gpu_memory()
            return
        uptime = info["now"] - info["start"]
        if not self._seen_healthy and uptime < self.startup_grace:
            return  # still loading the model
        self._failures += 1
        log(f"program={self.program} pid={self._pid} healthz=failed count={self._failures}/{self.max_failures} "
            f"timeout_s={self.timeout}")
        if self._failures >= self.max_failures:
            self.restart(f"/healthz failed {self._failures} times in a row")

    def _check_gpu_memory(self) -> None:
        if not self.min_free_gpu_mib:
            return
        _, state = self.probe(f"{self.url}/readyz", self.timeout)
        free = state.get("gpu_free_mib")
        if free is None or free >= self.min_free_gpu_mib:
            self._low_memory = 0
            return
        self._low_memory += 1
        log(f"program={self.program} gpu_free_mib={free} under={self.min_free_gpu_mib} "
            f"count={self._low_memory}/{self.low_memory_ticks} busy={state.get('busy')}")
        if self._low_memory >= self.low_memory_ticks and state.get("engine_process"):
            # The service replaces its engine process itself once no job waits or runs: the page and the line stay.
            log(f"program={self.program} pid={self._pid} asking for a new engine process (SIGUSR2) reason='free GPU "
                f"memory {free} MiB under {self.min_free_gpu_mib} MiB'")
            self.rpc.supervisor.signalProcess(self.program, "USR2")
            self._low_memory = 0
        elif self._low_memory >= self.low_memory_ticks and not state.get("busy", True):
            self.restart(f"free GPU memory {free} MiB under {self.min_free_gpu_mib} MiB while idle")

    def restart(self, reason: str) -> None:
        log(f"program={self.program} pid={self._pid} restarting reason={reason!r}")
        try:
            # faulthandler in the service prints every thread's stack on SIGUSR1, even when Python is stuck in C.
            self.rpc.supervisor.signalProcess(self.program, "USR1")
            time.sleep(1)
        except Exception as error:
            log(f"program={self.program} SIGUSR1 for a stack dump answered {error!r}")
        try:
            self.rpc.supervisor.stopProcess(self.program, True)
        except Exception as error:  # already stopped: supervisor answers with a fault; start it anyway
            log(f"program={self.program} stop answered {error!r}")
        self.rpc.supervisor.startProcess(self.program, False)
        log(f"program={self.program} restart requested")
        self._pid = None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--program", default="z-image-turbo", help="supervisor program to watch")
    parser.add_argument("--url", default="http://127.0.0.1:7860", help="the service's base URL")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds a probe may take")
    parser.add_argument("--failures", type=int, default=3, help="failed probes in a row before a restart")
    parser.add_argument("--startup-grace", type=float, default=300.0,
                        help="seconds after a start before failures count, unless it was healthy sooner")
    parser.add_argument("--min-free-gpu-mib", type=int, default=0, help="GPU memory watermark (0: off)")
    parser.add_argument("--low-memory-ticks", type=int, default=3, help="ticks under the watermark before a restart")
    return parser


def main(argv=None, stdin=sys.stdin, stdout=sys.stdout, rpc=None) -> None:
    args = build_parser().parse_args(argv)
    watchdog = Watchdog(rpc or childutils.getRPCInterface(os.environ), args.program, args.url, timeout=args.timeout,
                        failures=args.failures, startup_grace=args.startup_grace,
                        min_free_gpu_mib=args.min_free_gpu_mib, low_memory_ticks=args.low_memory_ticks)
    log(f"watching program={args.program} url={args.url} failures={args.failures} timeout_s={args.timeout}")
    while True:
        headers, _payload = childutils.listener.wait(stdin, stdout)
        if headers["eventname"].startswith("TICK"):
            try:
                watchdog.tick()
            except Exception as error:  # a listener that dies stops watching; log and go on instead
                log(f"tick failed: {error!r}")
        childutils.listener.ok(stdout)


if __name__ == "__main__":
    main()
