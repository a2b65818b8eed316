"""The one error type users see for bad input.

It is a ``click.ClickException`` so that plain ``mergekit-yaml`` (a click command)
prints ``Error: <message>`` instead of a traceback, and a ``ValueError`` for Python
callers.
"""

from __future__ import annotations

import click


class CoreSpaceError(click.ClickException, ValueError):
    """Bad input for a core-space merge; the message names the file or field."""

    def __init__(self, message: str):
        super().__init__(message)

    def __str__(self) -> str:
        return self.message


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
