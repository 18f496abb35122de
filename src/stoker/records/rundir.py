"""Where a run's files go: ``./runs/<UTC time>-<name>/`` unless told otherwise.

Precedence: an explicit directory, then ``$STOKER_RUN_DIR`` (set by ``stoker run`` so that
every rank and every elastic restart of a job shares one directory, and by ``check-resume`` /
``reproduce``), then ``<root>/<UTC time>-<name>`` where ``root`` is the argument, else
``$STOKER_RUNS_DIR``, else ``./runs``.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from pathlib import Path

from stoker.errors import StokerError

__all__ = [
    "RUNS_DIR_ENV",
    "RUN_DIR_ENV",
    "cannot_create",
    "new_run_id",
    "resolve_run_dir",
    "runs_root",
]

RUN_DIR_ENV = "STOKER_RUN_DIR"
RUNS_DIR_ENV = "STOKER_RUNS_DIR"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]+")


def runs_root(root: str | Path | None = None) -> Path:
    """The directory holding run directories: ``root``, else ``$STOKER_RUNS_DIR``, else ./runs."""
    if root is not None:
        return Path(root)
    return Path(os.environ.get(RUNS_DIR_ENV) or "runs")


def new_run_id(name: str, now: _dt.datetime | None = None) -> str:
    """``20250131-235959-name``: sorts by start time (UTC), safe in any filesystem."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    clean = _UNSAFE.sub("-", name).strip("-.") or "run"
    return f"{now:%Y%m%d-%H%M%S}-{clean}"


def cannot_create(
    path: Path, exc: OSError, *, directory: str | Path | None = None, root: str | Path | None = None
) -> StokerError:
    """The one-line error for a run directory that cannot be created, naming where its
    location came from (see the module docstring)."""
    if directory is not None:
        source = "RecordConfig(directory=...)"
    elif os.environ.get(RUN_DIR_ENV):
        source = f"${RUN_DIR_ENV}"
    elif root is not None:
        source = "RecordConfig(root=...)"
    elif os.environ.get(RUNS_DIR_ENV):
        source = f"${RUNS_DIR_ENV}"
    else:
        source = f"the current directory's runs/ (or set ${RUNS_DIR_ENV})"
    return StokerError(
        f"cannot create the run directory {path}: {exc.strerror or exc}; point {source} at a "
        "writable directory, or pass record=False to Stoker to record nothing"
    )


def _broadcast(path: Path | None) -> Path | None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return path
    box = [str(path) if path is not None else None]
    dist.broadcast_object_list(box, src=0)  # rank 0's choice: timestamps differ per rank
    return Path(box[0]) if box[0] is not None else None


def resolve_run_dir(
    name: str, *, directory: str | Path | None = None, root: str | Path | None = None
) -> Path:
    """The run directory for a run called ``name`` (not created here, except to claim an id).

    Under ``torch.distributed`` without ``$STOKER_RUN_DIR``, rank 0 picks and broadcasts it.
    """
    if directory is not None:
        return Path(directory)
    env = os.environ.get(RUN_DIR_ENV)
    if env:
        return Path(env)
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    chosen: Path | None = None
    if rank == 0:
        base = runs_root(root)
        run_id = new_run_id(name)
        chosen, n = base / run_id, 1
        try:
            base.mkdir(parents=True, exist_ok=True)
            while True:  # two runs started in the same second get -2, -3, ...
                try:
                    chosen.mkdir()
                    break
                except FileExistsError:
                    n += 1
                    chosen = base / f"{run_id}-{n}"
        except OSError as exc:
            raise cannot_create(chosen, exc, root=root) from None
    out = _broadcast(chosen)
    assert out is not None
    return out
