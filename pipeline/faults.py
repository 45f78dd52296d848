"""Test-only fault injection, so the crash handling can be proven on a CPU without a broken GPU.

Set ZIMAGE_FAULT (and ZIMAGE_TEST_MODE=1, without which the service refuses to start):

    hang@STEP     at denoising step STEP of the first request, freeze the whole process (SIGSTOP): alive but
                  unresponsive, as a stuck CUDA call leaves it. Only an outside watchdog can notice.
    fatal@STEP    at step STEP, raise the engine's FatalError: the path a poisoned GPU context takes.
    spawn-child   at start, spawn a child process that ignores SIGTERM, so stopping must take the whole group.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass

log = logging.getLogger("zimage.faults")

FAULT_ENV = "ZIMAGE_FAULT"
TEST_MODE_ENV = "ZIMAGE_TEST_MODE"
STEP_FAULTS = ("hang", "fatal")
START_FAULTS = ("spawn-child",)


class FaultConfigError(ValueError):
    """A fault switch that must not be honoured; the message says why."""


class InjectedFatalError(RuntimeError):
    """Raised by the `fatal` fault; the engine treats it like a poisoned GPU context."""


@dataclass(frozen=True)
class FaultPlan:
    kind: str | None = None
    step: int = 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> FaultPlan:
        spec = environ.get(FAULT_ENV, "").strip()
        if not spec:
            return cls()
        if environ.get(TEST_MODE_ENV) != "1":
            raise FaultConfigError(f"{FAULT_ENV}={spec!r} is a test-only fault switch and {TEST_MODE_ENV} is not 1; "
                                   f"refusing to start. Remove {FAULT_ENV} from the environment.")
        kind, _, step = spec.partition("@")
        if kind in START_FAULTS and not step:
            return cls(kind)
        if kind in STEP_FAULTS and step.isdigit() and int(step) >= 1:
            return cls(kind, int(step))
        raise FaultConfigError(f"{FAULT_ENV}={spec!r} is not a known fault (hang@STEP, fatal@STEP, spawn-child).")

    def at_start(self) -> None:
        if self.kind == "spawn-child":
            child = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                                      "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(3600)"])
            log.warning("TEST FAULT spawn-child: child pid=%d ignores SIGTERM", child.pid)

    def at_step(self, step: int) -> None:
        if step != self.step:
            return
        if self.kind == "hang":
            log.warning("TEST FAULT hang: freezing the process at step %d", step)
            for handler in logging.getLogger().handlers:
                handler.flush()
            os.kill(os.getpid(), signal.SIGSTOP)
        elif self.kind == "fatal":
            raise InjectedFatalError(f"TEST FAULT fatal at step {step}: simulated poisoned GPU context")
