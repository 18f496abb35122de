"""Finding checkpoints: list them, pick the newest that verifies, prune old ones.

A run's checkpoints are sibling directories named ``step-<number>`` (zero-padded to 8 digits
by :class:`~stoker.checkpoint.Checkpointer`; any number of digits is accepted). Directories
starting with a dot are unfinished saves and never considered.
"""

from __future__ import annotations

import logging
import re
import shutil
import warnings
from pathlib import Path

from stoker.checkpoint.errors import CheckpointError, CheckpointWarning
from stoker.checkpoint.manifest import verify

__all__ = [
    "checkpoint_name",
    "checkpoints_dir",
    "latest_valid",
    "list_checkpoints",
    "prune",
    "remove_leftovers",
]

log = logging.getLogger(__name__)
_STEP_DIR = re.compile(r"step-(\d+)")


def checkpoint_name(step: int) -> str:
    """``step-00000123`` for step 123: names sort in step order up to 10^8 steps."""
    return f"step-{step:08d}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``step-N`` directory under ``root``, oldest first (unverified)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.fullmatch(child.name)
        if m and child.is_dir():
            found.append((int(m.group(1)), child))
    return sorted(found)


def checkpoints_dir(root: str | Path) -> Path:
    """``root`` if it holds ``step-N`` checkpoints, else its ``checkpoints/`` if that exists
    (a run directory), else ``root``."""
    root = Path(root)
    if (root / "checkpoints").is_dir() and not list_checkpoints(root):
        return root / "checkpoints"
    return root


def latest_valid(root: str | Path) -> Path | None:
    """The newest checkpoint under ``root`` whose files all match their manifest, or None.

    ``root`` is a directory of ``step-N`` checkpoints, or a run directory holding one in
    ``checkpoints/``. Each newer checkpoint that fails verification (no manifest: interrupted;
    wrong size: truncated; wrong SHA-256: corrupted; a FIFO, a symlink, or a directory
    resolving outside ``root``: planted) is skipped with a :class:`CheckpointWarning` naming
    it and the reason.
    """
    root = checkpoints_dir(root)
    for _step, path in reversed(list_checkpoints(root)):
        try:
            verify(path, root=root)
        except CheckpointError as exc:
            warnings.warn(f"skipping checkpoint {path}: {exc}", CheckpointWarning, stacklevel=2)
            continue
        return path
    return None


def prune(root: str | Path, keep_last: int, *, protect: Path | None = None) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints under ``root``; returns those removed.

    ``protect`` (the checkpoint just written) is never removed. Each is renamed aside
    (``.old-<name>-pruned``) before its files are deleted: a process killed mid-delete leaves a
    leftover that :func:`remove_leftovers` clears, never a half-deleted ``step-N``.
    """
    if keep_last < 1:
        raise CheckpointError(f"keep_last={keep_last}; keep at least the newest checkpoint (1)")
    found = list_checkpoints(root)
    removed = []
    for _step, path in found[: max(0, len(found) - keep_last)]:
        if protect is not None and path.resolve() == Path(protect).resolve():
            continue
        aside = path.with_name(f".old-{path.name}-pruned")
        try:
            path.rename(aside)
        except OSError:
            aside = path  # (a rename refused by the filesystem: delete in place)
        shutil.rmtree(aside, ignore_errors=True)
        removed.append(path)
        log.debug("removed old checkpoint %s", path)
    return removed


def remove_leftovers(root: str | Path) -> list[Path]:
    """Delete what crashed saves left behind; returns what was deleted.

    ``.tmp-<name>`` is a save that never finished; ``.old-<name>-<pid>`` a previous checkpoint
    of that name, moved aside while being replaced. Neither is ever renamed into a checkpoint:
    nothing on disk proves who wrote it (a planted ``.old-step-00000500-1`` would otherwise be
    promoted and loaded). The only process that may put an ``.old-*`` back is the one that
    moved it, when its own rename fails (``store._publish``); after a crash between its two
    renames, resuming uses the newest ``step-N`` that remains.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    gone = []
    for child in sorted(root.iterdir()):
        if not child.name.startswith((".tmp-", ".old-")):
            continue
        if child.is_symlink() or not child.is_dir():
            child.unlink(missing_ok=True)  # never follow a link into someone else's files
        else:
            shutil.rmtree(child, ignore_errors=True)
        gone.append(child)
    return gone
