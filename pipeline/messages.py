"""Errors shown in one line: a log field or a health answer has room for the first line of a message only; and the
one family of errors that stop the service from starting."""

from __future__ import annotations


class StartupError(Exception):
    """The service cannot start as configured. The message is one line naming what is wrong and how to fix it;
    app.main logs it as `cannot start: <message>` and exits with `exit_code`: 2 for a setting to change (as for a bad
    flag), 1 for the machine or its files."""

    exit_code = 1


def first_line(error: BaseException) -> str:
    """The first line of the error's message, or its type's name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
