"""Errors a user can fix, and the "did you mean" that makes their one line useful.

A leaf: it imports nothing of the package, so every module may raise `SpecError`.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class SpecError(ValueError):
    """A run spec (or its data, weights or cluster) that cannot be run; the message is one line for the user."""


class ClusterError(RuntimeError):
    """The cluster did not provide what the run needs (e.g. no slot placed in time); one line for the user."""


class RunFailed(RuntimeError):
    """A step of a run could not finish (e.g. the report could not be written: a full disk); one line for the
    user, and run.json says `failed` with it."""


def suggest(word: str, valid: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest valid name, else ' (valid: a, b, c)'."""
    valid = list(valid)
    close = difflib.get_close_matches(str(word), valid, n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(valid)})"


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none: what a one-line
    error says of the exception that caused it."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
