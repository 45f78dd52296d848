"""The start of an engine process (pipeline.engine_worker), importable without torch: the front starts its first
engine process before it imports the model libraries itself, so the two processes import side by side and a start
or restart of the service waits for the slower of them, not for both in a row (pipeline.engine_process keeps it)."""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

CONTEXT = multiprocessing.get_context("spawn")  # why not fork: pipeline.engine_process


@dataclass(frozen=True)
class Spawned:
    """An engine process just started, and the front's end of its pipe."""

    process: multiprocessing.process.BaseProcess
    connection: Connection


def spawn_engine_process() -> Spawned:
    """A new engine process, importing its libraries, a standby until it is sent Load. It dies with the thread that
    calls this (see _die_with_the_front): call it from one that lives as long as the service."""
    ours, theirs = CONTEXT.Pipe()
    process = CONTEXT.Process(target=engine_process_main, args=(theirs,), name="zimage-engine", daemon=True)
    process.start()
    theirs.close()
    return Spawned(process, ours)


def engine_process_main(connection: Connection) -> None:
    """The engine process's first code, before the seconds of imports: tied to the front, and deaf to SIGTERM and
    SIGINT. Those are the front's to act on: `supervisorctl stop` signals the whole process group (stopasgroup), and
    Ctrl-C the terminal's, and the front then lets the running job finish before it closes the pipe; an engine
    process that died of the signal would lose that job."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_the_front()
    started = time.perf_counter()
    from pipeline.engine_worker import worker_main

    worker_main(connection, started)


def _die_with_the_front() -> None:
    """The kernel sends this process SIGKILL when the thread that started it ends (the front's, killed or not).
    Linux's prctl has no wrapper in the standard library; elsewhere the closed pipe alone ends the process."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the front died before the call above took effect
        os._exit(0)
