"""Test-only fault injection, so the failure handling can be proven on a CPU without a broken GPU.

Set ZIMAGE_FAULT (and ZIMAGE_TEST_MODE=1, without which the service refuses to start) to KIND@STEP[/EVERY]:
the fault fires at denoising step STEP of every EVERY-th request (every request when /EVERY is left out).

    oom       raise CUDA's out-of-memory error: the request fails cleanly, the service goes on
    nan       turn the latents into NaN: the NaN check refuses the image
    poison    raise the "illegal memory access" error of a poisoned CUDA context: snapshot, exit 1
    slow      stop making progress (sleep): the in-process hang detector dumps stacks and exits 1
    hang      freeze the whole process (SIGSTOP): alive but unresponsive; only the outside watchdog notices
    spawn-child   (no @STEP) at start, spawn a child that ignores SIGTERM, so stopping must take the whole group

A test that builds a FaultPlan itself can also give `prompt`: the fault then fires only for requests with that prompt,
whatever their number, so it picks one request, and one replica of several, out of a run.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from pipeline.messages import StartupError

log = logging.getLogger("zimage.faults")

FAULT_ENV = "ZIMAGE_FAULT"
TEST_MODE_ENV = "ZIMAGE_TEST_MODE"
STEP_FAULTS = ("oom", "nan", "poison", "slow", "hang")
START_FAULTS = ("spawn-child",)
_STEP_SPEC = re.compile(r"^(?P<kind>[a-z-]+)@(?P<step>[1-9]\d*)(?:/(?P<every>[1-9]\d*))?$")


class FaultConfigError(StartupError):
    """A fault switch that must not be honoured; the message says why."""

    exit_code = 2


@dataclass(frozen=True)
class FaultPlan:
    kind: str | None = None
    step: int = 0
    every: int = 1
    prompt: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> FaultPlan:
        spec = environ.get(FAULT_ENV, "").strip()
        if not spec:
            return cls()
        if environ.get(TEST_MODE_ENV) != "1":
            raise FaultConfigError(f"{FAULT_ENV}={spec!r} is a test-only fault switch and {TEST_MODE_ENV} is not 1; "
                                   f"refusing to start. Remove {FAULT_ENV} from the environment.")
        if spec in START_FAULTS:
            return cls(spec)
        match = _STEP_SPEC.match(spec)
        if match and match["kind"] in STEP_FAULTS:
            return cls(match["kind"], int(match["step"]), int(match["every"] or 1))
        raise FaultConfigError(f"{FAULT_ENV}={spec!r} is not a known fault: KIND@STEP[/EVERY] with KIND one of "
                               f"{', '.join(STEP_FAULTS)}, or spawn-child.")

    def at_start(self) -> None:
        if self.kind == "spawn-child":
            child = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                                      "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(3600)"])
            log.warning("TEST FAULT spawn-child: child pid=%d ignores SIGTERM", child.pid)

    def at_step(self, step: int, request_number: int, prompt: str, latents: torch.Tensor) -> torch.Tensor | None:
        """Called after each denoising step of request `request_number` (1-based); may return replaced latents."""
        if self.kind not in STEP_FAULTS or step != self.step or request_number % self.every:
            return None
        if self.prompt is not None and prompt != self.prompt:
            return None
        log.warning("TEST FAULT %s at step %d of request %d", self.kind, step, request_number)
        if self.kind == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (TEST FAULT oom)")
        if self.kind == "nan":
            return torch.full_like(latents, float("nan"))
        if self.kind == "poison":
            raise RuntimeError("CUDA error: an illegal memory access was encountered (TEST FAULT poison)")
        if self.kind == "slow":
            while True:
                time.sleep(60)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGSTOP)
        return None
