"""Hang watching. A GPU call that never returns cannot be interrupted from Python: a thread of its own notices a job
past its time limit, dumps every thread's stack to stderr (the log) so the operator sees where it stuck, and hands
it to a callback, which in the service ends the process so the supervisor starts a clean one."""

from __future__ import annotations

import faulthandler
import logging
import sys
import threading
import time
from collections.abc import Callable

log = logging.getLogger("zimage.hangs")

CHECK_INTERVAL_S = 1.0


class HangWatch:
    def __init__(self, timeout_s: float, on_hang: Callable[[str, float], None]):
        """`on_hang(job_id, seconds)` is called once per hung job, after the stacks are dumped."""
        self.timeout_s = timeout_s
        self._on_hang = on_hang
        self._job: tuple[str, float] | None = None  # (id, time.monotonic() when it began)
        threading.Thread(target=self._watch, name="hang-detector", daemon=True).start()

    def begin(self, job_id: str) -> None:
        self._job = (job_id, time.monotonic())

    def end(self) -> None:
        self._job = None

    def _watch(self) -> None:
        while True:
            time.sleep(CHECK_INTERVAL_S)
            job = self._job
            if job is None or time.monotonic() - job[1] < self.timeout_s:
                continue
            job_id, seconds = job[0], time.monotonic() - job[1]
            log.critical("request id=%s outcome=hung seconds=%.0f limit_s=%.0f; stacks of all threads follow",
                         job_id, seconds, self.timeout_s)
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            self._job = None  # reported once
            self._on_hang(job_id, seconds)
