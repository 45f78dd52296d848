"""Errors shown in one line: a log field or a health answer has room for the first line of a message only."""

from __future__ import annotations


def first_line(error: BaseException) -> str:
    """The first line of the error's message, or its type's name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
