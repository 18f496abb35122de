"""Where stoker keeps what it builds once per machine (tokenizers, tokenized corpora).

The directory is ``$STOKER_CACHE`` if set, else ``$XDG_CACHE_HOME/stoker``, else
``~/.cache/stoker``. Everything in it can be deleted at any time; it is rebuilt on demand.
Files are written atomically (a temporary sibling, then :func:`os.replace`), so a reader never
sees half a file and several ranks building the same entry at once is harmless.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write_bytes", "cache_dir"]


def cache_dir(subdir: str | None = None) -> Path:
    """The stoker cache directory (or ``subdir`` inside it), created if missing."""
    explicit = os.environ.get("STOKER_CACHE")
    if explicit:
        root = Path(explicit).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "stoker"
    path = root / subdir if subdir else root
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
