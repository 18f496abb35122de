"""Where a run's files go: ``./runs/<UTC time>-<name>/`` unless told otherwise.

Precedence: an explicit directory, then ``$STOKER_RUN_DIR`` (set by ``stoker run`` so that
every rank and every elastic restart of a job shares one directory, and by ``check-resume`` /
``reproduce``), then ``<root>/<UTC time>-<name>`` where ``root`` is the argument, else
``$STOKER_RUNS_DIR``, else ``./runs``.

One process at a time writes a run directory (:func:`claim`): a second live process given the
same directory (the same ``$STOKER_RUN_DIR`` in two shells) is refused with one line naming
the process that has it, rather than interleaving its metrics with the first one's and racing
its checkpoints. Picking a fresh directory instead would quietly split what the user meant as
one run (a resume into it) in two. Ranks of one job do not claim it: only rank 0 writes.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import os
import re
import socket
from pathlib import Path

from stoker.errors import StokerError

__all__ = [
    "RUNS_DIR_ENV",
    "RUN_DIR_ENV",
    "Claim",
    "cannot_create",
    "claim",
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


def _source(directory: str | Path | None, root: str | Path | None) -> str:
    """The setting a run directory's location came from (see the module docstring)."""
    if directory is not None:
        return "RecordConfig(directory=...)"
    if os.environ.get(RUN_DIR_ENV):
        return f"${RUN_DIR_ENV}"
    if root is not None:
        return "RecordConfig(root=...)"
    if os.environ.get(RUNS_DIR_ENV):
        return f"${RUNS_DIR_ENV}"
    return f"the current directory's runs/ (or set ${RUNS_DIR_ENV})"


def cannot_create(
    path: Path, exc: OSError, *, directory: str | Path | None = None, root: str | Path | None = None
) -> StokerError:
    """The one-line error for a run directory that cannot be created, naming where its
    location came from (see the module docstring)."""
    return StokerError(
        f"cannot create the run directory {path}: {exc.strerror or exc}; point "
        f"{_source(directory, root)} at a writable directory, or pass record=False to Stoker "
        "to record nothing"
    )


_LOCK = ".lock"


class Claim:
    """This process's hold on a run directory, from :func:`claim` until :meth:`release`."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    def release(self) -> None:
        """Let another process have the directory (also done by the process's exit). Idempotent."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def claim(run_dir: Path, *, directory: str | Path | None = None) -> Claim:
    """Claim ``run_dir`` (existing) for this process, or raise :class:`StokerError` naming the
    live process that holds it.

    The claim is a POSIX record lock (``fcntl.lockf``) on ``run_dir/.lock``, which holds the
    owner's pid and host. The kernel drops it when the owner exits, however it dies (SIGKILL
    included), so a dead owner never blocks an elastic restart or a resume; and it is not
    inherited by forked children, so DataLoader workers orphaned by a SIGKILL do not hold the
    directory either. The same process may claim a directory again (a restart within one
    process; the lock belongs to the process, so the first release ends both). On a
    filesystem without locks (``ENOLCK``: some network mounts) the directory is used
    unclaimed, as before.
    """
    path = run_dir / _LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        owner = os.pread(fd, 256, 0).decode("utf-8", errors="replace").split()
        os.close(fd)
        if exc.errno not in (errno.EACCES, errno.EAGAIN):  # no locking on this filesystem
            return Claim(None)
        pid, host = [*owner, "?", "?"][:2]
        raise StokerError(
            f"{run_dir} is in use by process {pid} on {host}: two processes writing one run "
            "directory interleave their metrics and race their checkpoints; wait for it to end "
            f"(or stop it), or point {_source(directory, None)} at another directory"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    return Claim(fd)


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
