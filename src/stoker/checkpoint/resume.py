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

__all__ = ["checkpoint_name", "latest_valid", "list_checkpoints", "prune", "remove_leftovers"]

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


def latest_valid(root: str | Path) -> Path | None:
    """The newest checkpoint under ``root`` whose files all match their manifest, or None.

    ``root`` is a directory of ``step-N`` checkpoints, or a run directory holding one in
    ``checkpoints/``. Each newer checkpoint that fails verification (no manifest: interrupted;
    wrong size: truncated; wrong SHA-256: corrupted) is skipped with a
    :class:`CheckpointWarning` naming it and the reason.
    """
    root = Path(root)
    if (root / "checkpoints").is_dir() and not list_checkpoints(root):
        root = root / "checkpoints"
    for _step, path in reversed(list_checkpoints(root)):
        try:
            verify(path)
        except CheckpointError as exc:
            warnings.warn(f"skipping checkpoint {path}: {exc}", CheckpointWarning, stacklevel=2)
            continue
        return path
    return None


def prune(root: str | Path, keep_last: int, *, protect: Path | None = None) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints under ``root``; returns those removed.

    ``protect`` (the checkpoint just written) is never removed.
    """
    if keep_last < 1:
        raise CheckpointError(f"keep_last={keep_last}; keep at least the newest checkpoint (1)")
    found = list_checkpoints(root)
    removed = []
    for _step, path in found[: max(0, len(found) - keep_last)]:
        if protect is not None and path.resolve() == Path(protect).resolve():
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
        log.debug("removed old checkpoint %s", path)
    return removed


def remove_leftovers(root: str | Path) -> list[Path]:
    """Clean up after a save that crashed; returns the directories deleted.

    ``.tmp-<name>`` (a save that never finished) is deleted. ``.old-<name>-<pid>`` (the previous
    checkpoint of that name, moved aside while being replaced) is moved back if ``<name>`` is
    missing, else deleted.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    gone = []
    for child in sorted(root.iterdir()):
        if not child.is_dir():
            continue
        if child.name.startswith(".old-"):
            original = root / child.name.removeprefix(".old-").rpartition("-")[0]
            if not original.exists():
                child.rename(original)
                continue
        elif not child.name.startswith(".tmp-"):
            continue
        shutil.rmtree(child, ignore_errors=True)
        gone.append(child)
    return gone
