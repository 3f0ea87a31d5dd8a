"""Exceptions as one line of text, for chat replies, CLI errors and stage failures (never a stack trace)."""

from __future__ import annotations


def first_line(err: BaseException) -> str:
    """The first line of the message; an empty message falls back to the exception's type name."""
    return (str(err).splitlines() or [type(err).__name__])[0]


def described(err: BaseException) -> str:
    """`Type: first line of the message` (just `Type: ` when the message is empty)."""
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
