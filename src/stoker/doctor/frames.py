"""Which Python frames are the user's: the doctor points at *your* line, never torch's or ours.

A frame is the user's when its file is outside torch, stoker, the standard library and installed
third-party packages (site-packages). ``<frozen ...>`` and ``<string>`` code is not the user's.
Results are cached per filename: the attribution pass asks this for every torch call.
"""

from __future__ import annotations

import os
import sys
import sysconfig
import types
from dataclasses import dataclass
from functools import lru_cache

import torch

import stoker

__all__ = ["Site", "caller_site", "is_user_file", "user_sites"]


@dataclass(frozen=True, slots=True)
class Site:
    """A place in the user's source: ``file:line`` inside ``function``."""

    file: str
    line: int
    function: str

    def __str__(self) -> str:
        return f"{_short(self.file)}:{self.line}"


def _short(path: str) -> str:
    """The path relative to the working directory when it is below it (what users type)."""
    try:
        rel = os.path.relpath(path)
    except ValueError:  # a different drive on Windows
        return path
    return path if rel.startswith("..") else rel


def _non_user_roots() -> tuple[str, ...]:
    roots = {
        os.path.dirname(os.path.abspath(torch.__file__)),
        os.path.dirname(os.path.abspath(stoker.__file__)),
    }
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        path = sysconfig.get_paths().get(key)
        if path:
            roots.add(os.path.abspath(path))
    # A stdlib root is a prefix of site-packages; both are non-user, so order does not matter.
    return tuple(sorted(r + os.sep for r in roots))


_ROOTS = _non_user_roots()


@lru_cache(maxsize=4096)
def is_user_file(filename: str) -> bool:
    """True when ``filename`` is the user's code rather than torch, stoker, stdlib or a library."""
    if not filename or filename.startswith("<"):
        return filename == "<stdin>"
    path = os.path.abspath(filename)
    if "site-packages" in path or "dist-packages" in path:
        return False
    return not path.startswith(_ROOTS)


def user_sites(frame: types.FrameType | None, limit: int = 64) -> tuple[Site, ...]:
    """The user's frames on the stack from ``frame`` outwards, innermost first."""
    sites: list[Site] = []
    depth = 0
    while frame is not None and depth < limit:
        code = frame.f_code
        if is_user_file(code.co_filename):
            sites.append(Site(code.co_filename, frame.f_lineno, code.co_name))
        frame = frame.f_back
        depth += 1
    return tuple(sites)


def caller_site(skip: int = 1) -> Site | None:
    """The innermost user frame above the caller (``skip`` frames up), or None."""
    frame: types.FrameType | None = sys._getframe(skip + 1)
    while frame is not None:
        code = frame.f_code
        if is_user_file(code.co_filename):
            return Site(code.co_filename, frame.f_lineno, code.co_name)
        frame = frame.f_back
    return None
