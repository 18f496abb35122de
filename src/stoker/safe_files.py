"""Reading back files someone else may have written: regular files only, inside a root, bounded.

Everything stoker reads from disk (a checkpoint's manifest, state, RNG and data-position JSON;
a run's ``record.json``, ``metrics.jsonl`` and ``code.patch``) may have been left there by
another user, another job, or a crafted download. ``path.read_bytes()`` trusts such a file
three ways: a FIFO blocks the reader for ever, a symlink to ``/dev/zero`` grows memory without
bound, and a symlink out of the directory reads a file that is not part of it. Every read here:

1. opens with ``O_NOFOLLOW`` (the file itself may not be a symlink) and ``O_NONBLOCK`` (opening
   a FIFO returns at once instead of waiting for a writer);
2. ``fstat``s the open descriptor, so what is checked is what is read, and refuses anything
   but a regular file (FIFO, device, socket, directory);
3. with a ``root``, refuses a file whose resolved path is outside the resolved root (a
   symlinked directory on the way pointing elsewhere);
4. refuses a file larger than ``limit`` before reading, and reads at most ``limit + 1`` bytes
   (a file that grows while being read);
5. for JSON, checks the top-level type the caller expects (a list where an object belongs).

Errors are one line, raised as the caller's error type (``error=``, default
:class:`~stoker.errors.StokerError`); a missing file raises :class:`FileNotFoundError` so the
caller can say what a missing file means. Nothing here writes.

    >>> import json, tempfile
    >>> from pathlib import Path
    >>> root = Path(tempfile.mkdtemp())
    >>> _ = (root / "a.json").write_text(json.dumps([1, 2]))
    >>> read_json(root / "a.json", expect=list, root=root)
    [1, 2]
    >>> read_json(root / "a.json", expect=dict)
    Traceback (most recent call last):
    ...
    stoker.errors.StokerError: .../a.json holds a JSON array where a JSON object belongs; ...
"""

from __future__ import annotations

import errno
import io
import json
import os
import stat
from pathlib import Path
from typing import Any

from stoker.errors import StokerError

__all__ = ["DEFAULT_LIMIT", "check_regular", "open_regular", "read_bytes", "read_json"]

DEFAULT_LIMIT = 16 << 20  # bytes: a record or a manifest is a few KB
_JSON_NAMES = {
    dict: "object",
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
}
_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"),
)


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _not_regular(path: Path, mode: int) -> str:
    return (
        f"{path} is {_kind(mode)}, not a regular file; it was not read (remove it, or restore "
        "the file stoker wrote)"
    )


def _inside(path: Path, root: Path) -> Path | None:
    """``path`` resolved, if it lies inside ``root`` resolved; else None."""
    resolved = path.resolve()
    return resolved if resolved.is_relative_to(root.resolve()) else None


def open_regular(
    path: str | os.PathLike[str],
    *,
    root: str | os.PathLike[str] | None = None,
    limit: int | None = DEFAULT_LIMIT,
    error: type[Exception] = StokerError,
) -> io.BufferedReader:
    """Open ``path`` for reading in binary, refusing anything but a regular file (see above).

    ``limit``: refuse a file larger than this many bytes (None: any size). Raises
    :class:`FileNotFoundError` if it does not exist, ``error`` for anything refused.
    """
    path = Path(path)
    if root is not None and _inside(path, Path(root)) is None:
        raise error(
            f"{path} resolves to {path.resolve()}, outside {root} (a symlink out of the "
            "directory); it was not read"
        )
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK):  # O_NOFOLLOW met a symlink
            raise error(f"{path} is a symbolic link; stoker reads only files it wrote") from None
        try:  # a socket cannot be opened at all (ENXIO): say what it is
            mode = os.lstat(path).st_mode
        except OSError:
            mode = stat.S_IFREG
        if not stat.S_ISREG(mode):
            raise error(_not_regular(path, mode)) from None
        raise error(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise error(_not_regular(path, info.st_mode))
        if limit is not None and info.st_size > limit:
            raise error(
                f"{path} has {info.st_size} bytes, more than the {limit} expected; it was not "
                "read (it is not a file stoker wrote)"
            )
        os.set_blocking(fd, True)  # a regular file: ordinary reads from here on
        return open(fd, "rb", closefd=True)  # the caller closes it
    except BaseException:
        os.close(fd)
        raise


def check_regular(
    path: str | os.PathLike[str],
    *,
    root: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    error: type[Exception] = StokerError,
) -> int:
    """Refuse ``path`` as :func:`open_regular` would, for readers that open it themselves
    (the safetensors parser maps the file); returns its size in bytes."""
    with open_regular(path, root=root, limit=limit, error=error) as f:
        return os.fstat(f.fileno()).st_size


def read_bytes(
    path: str | os.PathLike[str],
    *,
    limit: int = DEFAULT_LIMIT,
    root: str | os.PathLike[str] | None = None,
    error: type[Exception] = StokerError,
) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (see the module docstring)."""
    with open_regular(path, root=root, limit=limit, error=error) as f:
        data = f.read(limit + 1)
    if len(data) > limit:  # it grew after fstat
        raise error(f"{path} grew past {limit} bytes while being read; it was not used")
    return data


def read_json(
    path: str | os.PathLike[str],
    *,
    expect: type | tuple[type, ...] = dict,
    limit: int = DEFAULT_LIMIT,
    root: str | os.PathLike[str] | None = None,
    error: type[Exception] = StokerError,
) -> Any:
    """Parse a regular file of at most ``limit`` bytes as JSON whose top level is ``expect``."""
    data = read_bytes(path, limit=limit, root=root, error=error)
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path} is not valid JSON ({exc})") from None
    except RecursionError:
        raise error(f"{path} is JSON nested too deeply to be a file stoker wrote") from None
    if not isinstance(doc, expect) or (isinstance(doc, bool) and bool not in _as_tuple(expect)):
        wanted = " or ".join(f"a JSON {_JSON_NAMES.get(t, t.__name__)}" for t in _as_tuple(expect))
        got = "null" if doc is None else _JSON_NAMES.get(type(doc), type(doc).__name__)
        raise error(
            f"{path} holds a JSON {got} where {wanted} belongs; it is not a file stoker wrote"
        )
    return doc


def _as_tuple(expect: type | tuple[type, ...]) -> tuple[type, ...]:
    return expect if isinstance(expect, tuple) else (expect,)
