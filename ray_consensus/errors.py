"""Every error of the package that a user can act on, and the "did you mean" that makes its one line useful.

A leaf: it imports nothing of the package, so every module may raise these. The CLI and the Python API
catch `UserError` alone: its message is one line for the user and `exit_code` what the CLI exits with
(2: the input is wrong, fix it and run again; 1: the run started and could not finish). `DecodeError`
is not a `UserError`: a file that cannot be decoded is a row of the run's errors/ table, and the run goes on.

    UserError
    ├── SpecError        a spec, its data, weights or cluster that cannot be run (exit 2, before Ray starts)
    ├── StorageError     an endpoint, key or bucket the user must fix (exit 2)
    ├── LeaseHeld        another live run holds the run root (exit 2)
    ├── ClusterError     the cluster did not provide what the run needs (exit 1)
    └── RunFailed        a step of a run could not finish; run.json says `failed` with it (exit 1)
    DecodeError          an image or mask that cannot be used: an errors/ row
"""

from __future__ import annotations

import difflib
from typing import Iterable


class UserError(Exception):
    """An error whose message is one line for the user; `exit_code` is the CLI's exit status for it."""

    exit_code = 2


class SpecError(UserError, ValueError):
    """A run spec (or its data, weights or cluster) that cannot be run; the message is one line for the user."""


class StorageError(UserError, RuntimeError):
    """A storage problem the user must fix (endpoint, keys, bucket); one-line message."""


class LeaseHeld(UserError, RuntimeError):
    """Another live run holds the run root."""


class ClusterError(UserError, RuntimeError):
    """The cluster did not provide what the run needs (e.g. no slot placed in time); one line for the user."""

    exit_code = 1


class RunFailed(UserError, RuntimeError):
    """A step of a run could not finish (e.g. the report could not be written: a full disk); one line for the
    user, and run.json says `failed` with it."""

    exit_code = 1


class DecodeError(ValueError):
    """An image or mask that cannot be used (missing, unreadable, not an image, out of range): the reason of
    its errors/ row."""


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
