"""No client text reaches the log raw: no forged lines, no terminal escapes, no endless lines."""

from __future__ import annotations

import io
import logging
import re
import subprocess
import sys
import time
import traceback
from types import SimpleNamespace

import pytest

from config import log_lines
from config.log_lines import (
    LOG_DATE_FORMAT,
    LOG_FORMAT,
    MAX_MESSAGE_CHARS,
    TRACEBACK_MARK,
    LinesToLog,
    Occasional,
    OneLinePerRecord,
    seconds_since_process_start,
)
from config.settings import PROJECT_DIR
from tests.helpers import generate_over_http, start_demo_app, stop_app

FORGED = "2026-01-01T00:00:00+0000 CRITICAL zimage.app all images deleted"
HOSTILE = f"a cat\n{FORGED}\r\x1b[31mred\x1b[0m\u2028\u202eevil\x7f\x85"
RECORD_HEAD = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} [A-Z]+ ")


def formatted(message: str, *args, exc_info=None) -> str:
    record = logging.LogRecord("zimage.test", logging.WARNING, __file__, 1, message, args, exc_info)
    return OneLinePerRecord(LOG_FORMAT, LOG_DATE_FORMAT).format(record)


def test_a_multi_line_message_is_one_line_with_every_control_character_escaped():
    line = formatted("prompt=%s", HOSTILE)
    assert "\n" not in line and "\x1b" not in line and "\r" not in line
    assert line.endswith(r"prompt=a cat\n" + FORGED + r"\r\x1b[31mred\x1b[0m\u2028\u202eevil\x7f\x85")


def test_a_traceback_keeps_its_lines_and_every_line_after_the_first_is_marked():
    try:
        raise ValueError(f"bad prompt {HOSTILE}")
    except ValueError:
        text = formatted("request failed", exc_info=sys.exc_info())
    head, *rest = text.split("\n")
    assert RECORD_HEAD.match(head) and head.endswith("request failed")
    assert rest[0] == TRACEBACK_MARK + "Traceback (most recent call last):"
    assert all(line.startswith(TRACEBACK_MARK) for line in rest)
    # The forged line cannot start a line of its own.
    assert TRACEBACK_MARK + FORGED + r"\r\x1b[31mred\x1b[0m\u2028\u202eevil\x7f\x85" in rest
    assert "\x1b" not in text


def test_bidi_marks_are_escaped_as_the_overrides_are():
    assert formatted("prompt=%s", "a\u200eb\u200fc\u061cd").endswith(r"prompt=a\u200eb\u200fc\u061cd")


def test_a_huge_message_is_cut_with_a_note_of_how_much():
    line = formatted("prompt=%s", "x" * (MAX_MESSAGE_CHARS + 5000))
    assert line.endswith(" [... 5007 more characters cut]")  # "prompt=" counts too
    assert len(line) < MAX_MESSAGE_CHARS + 200


def _printed_to_log(write) -> list[str]:
    """The log's lines after `write(stream)` printed to a LinesToLog standing in for stderr."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(OneLinePerRecord(LOG_FORMAT, LOG_DATE_FORMAT))
    logger = logging.getLogger("test.stderr")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        stream = LinesToLog(logger, logging.WARNING, io.StringIO())
        write(stream)
        stream.flush()  # a last line without its newline is not lost
    finally:
        logger.removeHandler(handler)
    return out.getvalue().splitlines()


def test_what_libraries_print_becomes_one_escaped_record_per_print():
    def print_client_text(stream):
        print("Received inputs:\n    [", HOSTILE, "]", file=stream)  # Gradio prints a refused request's inputs
        print("a second print", file=stream)
        print("one without its newline", end="", file=stream)

    lines = _printed_to_log(print_client_text)
    assert len(lines) == 3 and all(RECORD_HEAD.match(line) for line in lines)
    # The client's newline is escaped inside the print's record: it starts no record of its own.
    assert lines[0].endswith(r" WARNING test.stderr Received inputs:\n    [ a cat\n" + FORGED
                             + r"\r\x1b[31mred\x1b[0m\u2028\u202eevil\x7f\x85 ]")
    assert lines[1].endswith(" a second print") and lines[2].endswith(" one without its newline")


def test_a_printed_traceback_is_one_record_and_repeats_without_it():
    def fail(prompt: str) -> None:
        raise ValueError(f"bad inputs: {prompt}")

    def print_tracebacks(stream):
        for prompt in (HOSTILE, "again"):
            try:
                fail(prompt)
            except ValueError:
                traceback.print_exc(file=stream)  # as Gradio prints a request it could not run
        print("next", file=stream)

    lines = _printed_to_log(print_tracebacks)
    records = [line for line in lines if RECORD_HEAD.match(line)]
    assert len(records) == 3
    assert records[0].endswith(" WARNING test.stderr ValueError: bad inputs: a cat")
    assert records[1].endswith(" ValueError: bad inputs: again (the same failure's traceback is in the log within "
                               "the last minute)")
    assert records[2].endswith(" next")
    marked = [line for line in lines if line.startswith(TRACEBACK_MARK)]
    assert marked[0] == TRACEBACK_MARK + "Traceback (most recent call last):"
    assert any("in fail" in line for line in marked) and not any(FORGED == line for line in lines)
    assert lines.index(records[1]) == len(lines) - 2  # the repeat brought no traceback lines


@pytest.mark.e2e
def test_a_forged_line_in_a_prompt_reaches_the_log_escaped(tmp_path, tiny_models):
    app = start_demo_app(tmp_path, tiny_models, "--log-prompts", "full")
    # What a prompt may hold (the engine refuses the other control characters): line breaks, a line separator, a
    # bidi override.
    prompt = f"a cat\n{FORGED}\r\u2028\u202eevil"
    try:
        assert generate_over_http(app.url, prompt, size="64x64", steps=1)["data"]
    finally:
        stop_app(app)
    log = app.log_path.read_bytes().decode()
    assert r"a cat\n2026-01-01T00:00:00+0000 CRITICAL zimage.app all images deleted\r\u2028\u202eevil" in log
    assert not any(line.startswith("2026-01-01") for line in log.splitlines())
    assert "\x1b" not in log and "\u2028" not in log and "\u202e" not in log
    for line in log.split("\n")[:-1]:
        assert RECORD_HEAD.match(line) or line.startswith(TRACEBACK_MARK), line


def test_a_librarys_repeated_warning_is_logged_once_and_ours_every_time():
    from config.log_lines import LibraryWarningsOnce

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__()
            self.records = []

        def emit(self, record):
            self.records.append((record.name, record.getMessage()))

    handler = Collect()
    handler.addFilter(LibraryWarningsOnce())
    loggers = [logging.getLogger(name) for name in ("diffusers.test", "transformers.test", "zimage.test")]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        for _ in range(3):
            loggers[0].warning("Attention backends are experimental.")
            loggers[0].info("an info line")
            loggers[2].warning("ours, each time")
        loggers[1].warning("Attention backends are experimental.")
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    assert handler.records.count(("diffusers.test", "Attention backends are experimental.")) == 1
    assert handler.records.count(("diffusers.test", "an info line")) == 3
    assert handler.records.count(("zimage.test", "ours, each time")) == 3
    assert ("transformers.test", "Attention backends are experimental.") in handler.records


def test_seconds_since_process_start_counts_a_childs_life_from_its_birth():
    """A child that sleeps a second before it asks has lived at least that long, and no longer than the parent
    watched it; this process, started before the test, has lived longer than the child's whole run."""
    spawned = time.monotonic()
    child = subprocess.run([sys.executable, "-c", "import time; time.sleep(1.0); from config.log_lines import "
                            "seconds_since_process_start as age; print(age())"],
                           cwd=PROJECT_DIR, capture_output=True, text=True, check=True, timeout=60)
    watched = time.monotonic() - spawned
    # The kernel gives a process's start in clock ticks (10 ms), rounded down: an age may read that much longer.
    assert 1.0 <= float(child.stdout) <= watched + 0.01
    assert seconds_since_process_start() > watched


def test_occasional_lines_count_each_kind_apart(caplog, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(log_lines, "time", SimpleNamespace(monotonic=lambda: now[0]))
    caplog.set_level(logging.INFO, logger="zimage.test-occasional")
    occasional = Occasional(logging.getLogger("zimage.test-occasional"), interval_s=10.0, level=logging.INFO)
    for _ in range(5):
        occasional("evicted %s", "a socket")
    for _ in range(3):
        occasional("cut off %s", "a reader")
    now[0] += 11
    occasional("evicted %s", "a socket")
    occasional("cut off %s", "a reader")
    assert [(record.levelno, record.getMessage()) for record in caplog.records] == [
        (logging.INFO, "evicted a socket (1 time(s) since the last such line)"),
        (logging.INFO, "cut off a reader (1 time(s) since the last such line)"),
        (logging.INFO, "evicted a socket (5 time(s) since the last such line)"),
        (logging.INFO, "cut off a reader (3 time(s) since the last such line)"),
    ]


def test_occasional_lines_may_come_a_few_times_an_interval_before_they_are_counted(caplog, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(log_lines, "time", SimpleNamespace(monotonic=lambda: now[0]))
    caplog.set_level(logging.INFO, logger="zimage.test-occasional-times")
    occasional = Occasional(logging.getLogger("zimage.test-occasional-times"), interval_s=10.0, times=3)
    for number in range(10):
        occasional("refused %d", number)
    now[0] += 11
    occasional("refused %d", 10)
    assert [record.getMessage() for record in caplog.records] == [
        "refused 0 (1 time(s) since the last such line)",
        "refused 1 (1 time(s) since the last such line)",
        "refused 2 (1 time(s) since the last such line)",
        "refused 10 (8 time(s) since the last such line)",
    ]
