"""Log lines a person can grep and a client cannot forge: one format for every record, control characters escaped,
tracebacks marked, and whatever libraries print turned into records too. configure_logging installs them (app.py in
the service's process, pipeline.engine_worker in its engine process)."""

from __future__ import annotations

import io
import logging
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
LOG_DATE_FORMAT = "%Y-%m-%dT%H:%M:%S%z"
MAX_MESSAGE_CHARS = 8192  # a prompt is at most a few thousand characters; more is a client filling the disk
TRACEBACK_MARK = "| "  # starts every line of a record after its first; see OneLinePerRecord
REPEAT_LOG_INTERVAL_S = 10.0  # an attack repeats the same event thousands of times a second: one line an interval


def _control_escapes() -> dict[int, str]:
    """Characters that break a line, move the cursor or recolour a terminal (C0, DEL, C1, the Unicode line and
    paragraph separators) or reorder what a reader sees (bidi overrides and marks), each as the escape Python
    would write. The backslash itself stays as it is: a client who types a literal "\\n" still cannot begin a
    line, and paths and regular expressions in messages stay readable."""
    escapes = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7f, 0xa0))}
    escapes.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"})
    separators_and_bidi = (0x2028, 0x2029, *range(0x202a, 0x202f), *range(0x2066, 0x206a), 0x200e, 0x200f, 0x061c)
    escapes.update({code: f"\\u{code:04x}" for code in separators_and_bidi})
    return escapes


CONTROL_ESCAPES = _control_escapes()


def _cut(text: str) -> str:
    if len(text) <= MAX_MESSAGE_CHARS:
        return text
    return f"{text[:MAX_MESSAGE_CHARS]} [... {len(text) - MAX_MESSAGE_CHARS} more characters cut]"


class OneLinePerRecord(logging.Formatter):
    """Client text (prompts, headers, the inputs Gradio echoes in its errors) reaches log messages and exception
    texts; raw, a newline in it forges a line of its own and an ESC recolours the operator's terminal. Here every
    control character is escaped, so a record's message is one line, and every line a record did not begin starts
    with TRACEBACK_MARK: only this formatter starts a line with a timestamp. Tracebacks keep their line breaks
    (marked, not escaped) because a person reads them top to bottom; `grep -v '^| '` leaves one line per record.
    A Formatter, not a Filter: the traceback text is made here, and a Filter would rewrite the record for every
    handler."""

    def format(self, record: logging.LogRecord) -> str:
        record.message = _cut(record.getMessage())
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        lines = [self.formatMessage(record).translate(CONTROL_ESCAPES)]
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        for detail in (record.exc_text, record.stack_info):
            if detail:
                lines += [TRACEBACK_MARK + _cut(line).translate(CONTROL_ESCAPES) for line in detail.split("\n")]
        return "\n".join(lines)


class OncePerInterval:
    """Whether an event of a kind is due its full account (a traceback) again: once per `interval_s` per kind (or
    `times` times: the first of each interval). The kinds remembered are bounded: past MAX_KINDS (no service has
    that many ways to fail) it starts afresh."""

    MAX_KINDS = 1000

    def __init__(self, interval_s: float, times: int = 1):
        self.interval_s, self.times = interval_s, times
        self._windows: dict[object, tuple[float, int]] = {}  # kind → when its interval began, accounts given in it

    def due(self, kind: object) -> bool:
        now = time.monotonic()
        began, given = self._windows.get(kind, (float("-inf"), 0))
        if now - began >= self.interval_s:
            began, given = now, 0
        if given >= self.times:
            return False
        if kind not in self._windows and len(self._windows) >= self.MAX_KINDS:
            self._windows.clear()
        self._windows[kind] = (began, given + 1)
        return True


class Occasional:
    """A line repeated by the thousand (an attack repeats the same event) logged at most once an interval for each
    message (its format string: a kind), or `times` times, with how many of that kind happened since its last
    line."""

    def __init__(self, logger: logging.Logger, interval_s: float = REPEAT_LOG_INTERVAL_S,
                 level: int = logging.WARNING, times: int = 1):
        self.logger, self.level = logger, level
        self.unlogged: Counter[str] = Counter()
        self._due = OncePerInterval(interval_s, times)

    def __call__(self, message: str, *args, exc_info: BaseException | None = None) -> None:
        self.unlogged[message] += 1
        if self._due.due(message):
            self.logger.log(self.level, message + " (%d time(s) since the last such line)", *args,
                            self.unlogged.pop(message), exc_info=exc_info)


TRACEBACK_STARTS = ("Traceback (most recent call last):", "During handling of the above exception",
                    "The above exception was the direct cause")
MAX_TRACEBACK_ENTRIES = 500  # frames of a printed traceback kept in one record; a deeper one is cut into several
TRACEBACK_INTERVAL_S = 60.0  # the same printed failure, repeated by a client in a loop, shows its traceback once


class LinesToLog(io.TextIOBase):
    """Stands in for sys.stdout / sys.stderr: what is written becomes records of `logger`, escaped like any other.
    Libraries print client text there directly (Gradio prints the path of a request it refuses, and the inputs it
    received in a traceback), so a record ends only where a write ends with a newline: a newline *inside* a
    written text, which may be the client's, is escaped in its record instead of starting one. A traceback printed
    entry by entry (traceback.print_exc) becomes one record, its exception line as the message and the traceback
    below it, marked (shown once a minute for the same failure). `fileno()` is the real stream's, so
    faulthandler's dumps (written to the descriptor, after a crash) still reach the log."""

    def __init__(self, logger: logging.Logger, level: int, real_stream):
        self.logger, self.level, self.real_stream = logger, level, real_stream
        self._pending = ""
        self._traceback: list[str] | None = None
        self._tracebacks_due = OncePerInterval(TRACEBACK_INTERVAL_S)
        self._lock = threading.Lock()
        self._inside = threading.local()

    def write(self, text: str) -> int:
        with self._lock:
            self._pending += text
            if not self._pending.endswith("\n") and len(self._pending) <= MAX_MESSAGE_CHARS:
                return len(text)
            entry, self._pending = self._pending.removesuffix("\n"), ""
            records = self._records(entry)
        self._log(records)
        return len(text)

    def flush(self) -> None:
        with self._lock:
            records = self._records(self._pending) if self._pending else []
            self._pending = ""
            if self._traceback is not None:
                records.append(self._printed_traceback(""))
        self._log(records)

    def _records(self, entry: str) -> list[tuple[str, str | None]]:
        """(message, traceback text or None) of each record this written entry completes."""
        if self._traceback is None:
            if entry.startswith(TRACEBACK_STARTS):
                self._traceback = [entry]
                return []
            return [(entry, None)]
        if entry[:1].isspace() or not entry or entry.startswith(TRACEBACK_STARTS):
            self._traceback.append(entry)
            return [self._printed_traceback("")] if len(self._traceback) >= MAX_TRACEBACK_ENTRIES else []
        return [self._printed_traceback(entry)]

    def _printed_traceback(self, exception: str) -> tuple[str, str | None]:
        """The traceback gathered so far, ended by its `exception` line(s), as one record; the gathering ends."""
        frames, self._traceback = self._traceback, None
        message = exception.partition("\n")[0] or "a traceback was printed"
        kind = (message.partition(":")[0][:100], next((frame for frame in reversed(frames) if "File " in frame), ""))
        if not self._tracebacks_due.due(kind):
            return f"{message} (the same failure's traceback is in the log within the last minute)", None
        return message, "\n".join([*frames, exception] if exception else frames)

    def _log(self, records: list[tuple[str, str | None]]) -> None:
        if getattr(self._inside, "active", False):
            # The logging machinery itself wrote here (a handler reporting its own failure): logging it again
            # would recurse, so it goes to the real stream, escaped all the same.
            self.real_stream.write("".join(f"{message.translate(CONTROL_ESCAPES)}\n" for message, _ in records))
            return
        if not self.logger.isEnabledFor(self.level):
            return
        self._inside.active = True
        try:
            for message, printed_traceback in records:
                record = self.logger.makeRecord(self.logger.name, self.level, "(printed)", 0, "%s", (message,), None)
                record.exc_text = printed_traceback  # OneLinePerRecord marks its lines, as an exception's
                self.logger.handle(record)
        finally:
            self._inside.active = False

    def fileno(self) -> int:
        return self.real_stream.fileno()

    def writable(self) -> bool:
        return True


class LibraryWarningsOnce(logging.Filter):
    """A library's identical warning once per process: diffusers repeats its own at every component it loads and
    every attention backend it is asked about ("Attention backends are an experimental feature" twice per start)."""

    LIBRARIES = ("diffusers", "transformers")

    def __init__(self):
        super().__init__()
        self._seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING or not record.name.startswith(self.LIBRARIES):
            return True
        key = (record.name, record.getMessage())
        if key in self._seen:
            return False
        self._seen.add(key)
        return True


def configure_logging(level: str, prefix: str = "", libraries: bool = True) -> None:
    """One format for every line, ours and the libraries', on stdout (supervisor writes it to the log file); no
    client text reaches it unescaped (OneLinePerRecord), not even what libraries print (LinesToLog). `prefix` starts
    every message: which process wrote it, where two write the same log. `libraries` False: diffusers' and
    transformers' loggers are left for route_library_logs, to be called before either library logs a line."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(OneLinePerRecord(LOG_FORMAT.replace("%(message)s", f"{prefix}%(message)s"), LOG_DATE_FORMAT))
    handler.addFilter(LibraryWarningsOnce())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    sys.stdout = LinesToLog(logging.getLogger("stdout"), logging.INFO, sys.stdout)
    sys.stderr = LinesToLog(logging.getLogger("stderr"), logging.WARNING, sys.stderr)
    if libraries:
        route_library_logs()
    for noisy in ("httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def route_library_logs() -> None:
    """diffusers' and transformers' records through the handler above, without their own handlers and progress
    bars. Importing them imports torch: seconds that a start whose weights cannot load need not spend."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.disable_default_handler()
        library.enable_propagation()
        library.disable_progress_bar()


def seconds_since_process_start() -> float:
    """How long this process has lived, imports included, for the log's account of a start. From the kernel's clock
    since boot and the process's start in it (/proc/self/stat, field 22, in clock ticks): psutil's create_time adds
    a boot time rounded to whole seconds, up to a second off."""
    start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
