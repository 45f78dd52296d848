"""What a dying process leaves behind: a JSON snapshot (thread stacks, GPU memory, recent requests) in the crash
directory, and faulthandler tracebacks in the log for the deaths Python cannot catch (SIGSEGV, SIGABRT, ...)."""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger("zimage.snapshot")

StateProvider = Callable[[], dict[str, object]]


def _thread_stacks() -> dict[str, list[str]]:
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    return {
        f"{names.get(ident, 'unknown')} ({ident})": traceback.format_stack(frame)
        for ident, frame in sys._current_frames().items()
    }


def _gpu_memory() -> dict[str, object]:
    if not torch.cuda.is_available():
        return {"cuda": False}
    try:
        free, total = torch.cuda.mem_get_info()
        return {"cuda": True, "free_bytes": free, "total_bytes": total,
                "allocated_bytes": torch.cuda.memory_allocated(), "reserved_bytes": torch.cuda.memory_reserved(),
                "max_allocated_bytes": torch.cuda.max_memory_allocated()}
    except RuntimeError as error:  # a poisoned context answers every call with an error
        return {"cuda": True, "error": str(error)}


def write_snapshot(crash_dir: Path, reason: str, state: dict[str, object],
                   error: BaseException | None = None) -> Path | None:
    """Write `snapshot-<pid>-<time>.json`; returns its path, or None when even that failed (it says so in the log)."""
    snapshot = {
        "reason": reason,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "pid": os.getpid(),
        "error": "".join(traceback.format_exception(error)) if error else None,
        "gpu_memory": _gpu_memory(),
        "service": state,
        "threads": _thread_stacks(),
    }
    try:
        crash_dir.mkdir(parents=True, exist_ok=True)
        path = crash_dir / f"snapshot-{os.getpid()}-{time.strftime('%Y%m%d-%H%M%S')}.json"
        path.write_text(json.dumps(snapshot, indent=2, default=str) + "\n", encoding="utf-8")
    except OSError:
        log.exception("could not write the crash snapshot to %s", crash_dir)
        return None
    log.critical("snapshot written file=%s reason=%r", path, reason)
    return path


def exit_on_fatal(crash_dir: Path, process: str = "") -> Callable[[BaseException, dict[str, object]], None]:
    """The engine's fatal handler: a snapshot, then this process ends non-zero, so its keeper (supervisor, or Serve
    for a replica: `process` names it in the lines) starts a clean one."""
    where = f" in {process}" if process else ""

    def on_fatal(error: BaseException, state: dict[str, object]) -> None:
        write_snapshot(crash_dir, f"fatal{where}: {error}", state, error)
        log.critical("exiting%s after a fatal error exit=1", where)
        logging.shutdown()
        os._exit(1)

    return on_fatal


def enable_fault_tracebacks() -> None:
    """Python tracebacks of every thread in the log when the process dies of a fatal signal (SIGSEGV, SIGABRT,
    ...), and on demand: `kill -USR1 <pid>` prints them without stopping anything."""
    faulthandler.enable(file=sys.stderr, all_threads=True)
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)


def install_snapshot_hooks(crash_dir: Path, state: StateProvider) -> None:
    """A snapshot for any exception that no code caught, in the main thread or another."""

    def on_main_thread_error(kind, value, tb):
        log.critical("unhandled error", exc_info=(kind, value, tb))
        write_snapshot(crash_dir, f"unhandled {kind.__name__}: {value}", state(), value)

    def on_thread_error(args: threading.ExceptHookArgs):
        if args.exc_type is SystemExit:
            return
        log.critical("unhandled error in thread %s", args.thread.name if args.thread else "?",
                     exc_info=(args.exc_type, args.exc_value, args.exc_traceback))
        write_snapshot(crash_dir, f"unhandled {args.exc_type.__name__} in a thread: {args.exc_value}", state(),
                       args.exc_value)

    sys.excepthook = on_main_thread_error
    threading.excepthook = on_thread_error
