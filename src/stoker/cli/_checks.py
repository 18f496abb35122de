"""Checks of command-line values, made before a subcommand starts any work.

A bad value found after minutes of training (a report that cannot be written, a timeout of
-5 s, zero timed calls) wastes the run and ends in a traceback. Each check raises a one-line
:class:`~stoker.errors.StokerError` naming the flag, the value and what to pass instead.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from stoker.errors import StokerError

__all__ = ["check_count", "check_number", "check_output_path", "check_script"]


def check_number(
    flag: str, value: float | None, *, unit: str, example: str, zero: bool = False
) -> None:
    """``value`` is finite and positive (or >= 0 with ``zero``); None (the default) passes."""
    if value is None:
        return
    ok = math.isfinite(value) and (value >= 0 if zero else value > 0)
    if not ok:
        kind = f"0 or a positive {unit}" if zero else f"a positive number of {unit}"
        raise StokerError(f"{flag} {value:g} is not {kind}; pass e.g. {flag} {example}")


def check_count(flag: str, value: int | None, *, least: int, what: str) -> None:
    """``value`` is an integer >= ``least``; None (the default) passes."""
    if value is not None and value < least:
        raise StokerError(f"{flag} {value}: needs at least {least} {what}")


def check_output_path(
    flag: str, value: str | os.PathLike[str] | None, *, default_name: str
) -> None:
    """``value`` (a file, or a directory to hold ``default_name``) can be created: its
    directory exists and is a directory. '' or None: no output, nothing to check."""
    if not value:
        return
    path = Path(value)
    if path.is_dir():
        path = path / default_name
    parent = path.parent
    if not parent.is_dir():
        why = "is not a directory" if parent.exists() else "does not exist"
        raise StokerError(
            f"{flag} {value}: cannot write there, {parent} {why}; create it or pass another path"
        )
    if not os.access(parent, os.W_OK):
        raise StokerError(f"{flag} {value}: {parent} is not writable; pass another path")


def check_script(script: str) -> None:
    """``script`` is a Python file (not a directory, not missing)."""
    if os.path.isdir(script):
        raise StokerError(
            f"{script!r} is a directory, not a script; pass the path of a Python file "
            f"(e.g. {os.path.join(script, 'train.py')})"
        )
    if not os.path.isfile(script):
        raise StokerError(f"no such script: {script!r}; pass the path of a Python file")
