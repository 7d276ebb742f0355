"""Errors every face reports the same way."""

from __future__ import annotations


class UsageError(ValueError):
    """Bad input from the user: reported as one line, exit status 2."""


def one_line(e: BaseException) -> str:
    """The error's message on one line (the type's name when it has none)."""
    text = " ".join(str(e).split())
    return text or type(e).__name__
