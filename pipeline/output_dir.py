"""Whether the output directory can take the next image: proved by a real write at start, and checked cheaply before
every job and every readiness probe, so that a full or read-only disk refuses requests instead of wasting GPU time
on images that cannot be saved."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path

from pipeline.messages import StartupError

log = logging.getLogger("zimage.output_dir")

# Room for a few of the largest PNGs (a 4096² one is under 64 MiB) with some margin for the rest of the disk's users.
MIN_FREE_BYTES = 64 * 2**20


class OutputDirError(StartupError):
    """The output directory cannot take images; the message names the directory and what is wrong with it."""


def prepare_output_dir(output_dir: Path, min_free_bytes: int = MIN_FREE_BYTES) -> None:
    """At start: create the directory if missing, then create and remove a small file in it. Permission bits alone
    cannot tell (root ignores them; a read-only mount or a full disk shows only when writing)."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write-test-") as probe:
            probe.write(b"z-image write test\n")
            probe.flush()
            os.fsync(probe.fileno())
    except FileExistsError:
        raise OutputDirError(f"output_dir {output_dir} exists but is not a directory") from None
    except OSError as error:
        raise OutputDirError(f"output_dir {output_dir} is not a writable directory: {error.strerror}") from None
    if problem := find_problem(output_dir, min_free_bytes):
        raise OutputDirError(problem)


def find_problem(output_dir: Path, min_free_bytes: int = MIN_FREE_BYTES) -> str | None:
    """What stops an image being saved now, or None: a few system calls, no write. A missing directory is fine
    where its nearest existing parent is writable, since saving creates the missing part."""
    existing = output_dir
    while not existing.exists():
        existing = existing.parent
    subject = f"output_dir {output_dir}"
    if existing != output_dir:
        subject += f" (missing; its parent {existing})"
    if not existing.is_dir():
        return f"{subject} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):  # also false on a read-only mount, even for root
        return f"{subject} is not writable"
    if shutil.disk_usage(existing).free < min_free_bytes:
        return f"{subject} has less than {min_free_bytes // 2**20} MiB free"
    return None


class OutputDirCheck:
    """`find_problem` for the engine and /readyz, which ask many times a minute: the log hears of a change only
    (one warning when the directory becomes unusable, one line when it is usable again)."""

    def __init__(self, output_dir: Path, min_free_bytes: int = MIN_FREE_BYTES) -> None:
        self.output_dir = output_dir
        self.min_free_bytes = min_free_bytes
        self._last: str | None = None
        self._lock = threading.Lock()  # the engine's thread and the server's event loop both ask

    def problem(self) -> str | None:
        problem = find_problem(self.output_dir, self.min_free_bytes)
        with self._lock:
            previous, self._last = self._last, problem
        if problem != previous:
            if problem:
                log.warning("output dir unusable: %s; requests are refused and /readyz answers 503 until it is "
                            "fixed", problem)
            else:
                log.info("output dir usable again: %s", self.output_dir)
        return problem
