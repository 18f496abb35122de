"""Reading run directories back: list them, find one by id, infer a killed run's status."""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stoker import safe_files
from stoker.errors import StokerError
from stoker.records.record import METRICS, RECORD, pid_start_time, read_record
from stoker.records.rundir import runs_root

__all__ = ["RunInfo", "effective_status", "find_run", "latest_run", "list_runs", "tail_metrics"]

# A heartbeat older than this many heartbeat periods means the process is gone.
_STALE_BEATS = 4
_LOSS_KEYS = ("loss", "train/loss", "train_loss")


def _parse_time(text: Any) -> _dt.datetime | None:
    if not isinstance(text, str):
        return None
    try:
        when = _dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    # stoker writes UTC with its offset; a time without one (edited by hand) is taken as UTC
    # rather than failing every comparison with an aware one.
    return when if when.tzinfo is not None else when.replace(tzinfo=_dt.timezone.utc)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def effective_status(record: dict[str, Any], now: _dt.datetime | None = None) -> str:
    """The recorded status, except ``running`` becomes ``killed`` when the process is gone.

    Same host: the pid no longer exists, or it was reused (its start time differs). Another
    host: the heartbeat is older than 4 heartbeat periods (at least 2 minutes).
    """
    status = str(record.get("status", "unknown"))
    if status != "running":
        return status
    pid = record.get("pid")
    host = (record.get("host") or {}).get("hostname")
    if isinstance(pid, int) and host == socket.gethostname():
        if not _pid_alive(pid):
            return "killed"
        recorded_start = record.get("pid_start")
        actual = pid_start_time(pid)
        if recorded_start is not None and actual is not None and actual != recorded_start:
            return "killed"
        return "running"
    beat = _parse_time(record.get("heartbeat"))
    period = float(record.get("heartbeat_seconds") or 30.0)
    now = now or _dt.datetime.now(_dt.timezone.utc)
    if beat is not None and (now - beat).total_seconds() > max(_STALE_BEATS * period, 120.0):
        return "killed"
    return "running"


def tail_metrics(run_dir: Path, max_bytes: int = 1 << 16) -> tuple[int | None, dict[str, Any]]:
    """``(last step, newest value of each metric)`` from the end of ``metrics.jsonl``."""
    path = Path(run_dir) / METRICS
    try:
        with safe_files.open_regular(path, limit=None) as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            chunk = f.read(max_bytes).decode("utf-8", errors="replace")
    except (OSError, StokerError):  # absent, or not a file the run wrote (a FIFO, a symlink)
        return None, {}
    last: dict[str, Any] = {}
    step = None
    lines = chunk.splitlines()
    if size > max_bytes:
        lines = lines[1:]  # the first may be cut
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict):
            continue
        if isinstance(rec.get("step"), int):
            step = rec["step"] if step is None else max(step, rec["step"])
        last.update({k: v for k, v in rec.items() if k not in ("step", "time")})
    return step, last


def _newest_mtime(run_dir: Path) -> _dt.datetime | None:
    stamps = []
    for child in run_dir.iterdir():
        try:
            stamps.append(child.stat().st_mtime)
        except OSError:
            continue
    if not stamps:
        return None
    return _dt.datetime.fromtimestamp(max(stamps), tz=_dt.timezone.utc)


@dataclass(frozen=True, slots=True)
class RunInfo:
    """One row of ``stoker runs``."""

    id: str
    dir: Path
    name: str
    status: str
    started: _dt.datetime | None
    ended: _dt.datetime | None
    steps: int | None
    last_loss: float | None
    record: dict[str, Any]

    @property
    def duration_s(self) -> float | None:
        if self.started is None:
            return None
        end = self.ended
        if end is None and self.status == "running":
            end = _dt.datetime.now(_dt.timezone.utc)
        elif end is None:  # killed: its last sign of life is the newest file it wrote
            end = _parse_time(self.record.get("heartbeat"))
            newest = _newest_mtime(self.dir)
            if newest is not None and (end is None or newest > end):
                end = newest
        return None if end is None else max(0.0, (end - self.started).total_seconds())


def run_info(run_dir: Path, *, root: Path | None = None) -> RunInfo:
    record = read_record(run_dir, root=root)
    step, last = tail_metrics(run_dir)
    summary = record.get("summary") or {}
    if step is None:
        step = summary.get("steps")
    loss = next((last[k] for k in _LOSS_KEYS if k in last), None)
    if loss is None:
        loss = next((summary.get("last", {}).get(k) for k in _LOSS_KEYS), None)
    return RunInfo(
        id=str(record.get("id", run_dir.name)),
        dir=run_dir,
        name=str(record.get("name", "")),
        status=effective_status(record),
        started=_parse_time(record.get("started")),
        ended=_parse_time(record.get("ended")),
        steps=step if isinstance(step, int) else None,
        last_loss=float(loss) if isinstance(loss, int | float) else None,
        record=record,
    )


def list_runs(
    root: str | Path | None = None, *, on_skip: Callable[[Path, str], None] | None = None
) -> list[RunInfo]:
    """Every run directory under ``root`` (default ./runs), oldest first.

    A directory whose ``record.json`` cannot be read (truncated, of the wrong shape, a FIFO,
    linked in from outside ``root``) is left out, and ``on_skip(directory, why)`` is told.
    """
    base = runs_root(root)
    if not base.is_dir():
        return []
    runs = []
    for child in sorted(base.iterdir()):
        if child.is_dir() and (child / RECORD).is_file():
            try:
                runs.append(run_info(child, root=base))  # not a run linked in from elsewhere
            except (OSError, ValueError) as exc:
                if on_skip is not None:
                    on_skip(
                        child, str(exc) if isinstance(exc, ValueError) else exc.strerror or str(exc)
                    )
    runs.sort(key=lambda r: (r.record.get("started") or "", r.id))
    return runs


def latest_run(name: str, root: str | Path | None = None) -> Path:
    """The newest run named ``name`` (by default a run is named after its script)."""
    base = runs_root(root)
    runs = [r for r in list_runs(base) if r.name == name]
    if not runs:
        raise StokerError(f"no {name} run under {base}")
    return runs[-1].dir


def find_run(ref: str, root: str | Path | None = None) -> Path:
    """A run directory from its id, a unique part of it, a path, or ``-1``
    (latest), ``-2``, ...; raises :class:`StokerError` listing candidates otherwise."""
    as_path = Path(ref)
    if (as_path / RECORD).is_file():
        return as_path
    base = runs_root(root)
    skipped: dict[Path, str] = {}
    runs = list_runs(base, on_skip=skipped.__setitem__)
    unreadable = [why for path, why in skipped.items() if path.name == ref]
    if unreadable:  # the run asked for is there, but its record cannot be used: say why
        raise StokerError(f"run {ref}: {unreadable[0]}")
    if not runs:
        raise StokerError(f"no runs under {base}; pass --root DIR if they are elsewhere")
    if ref.startswith("-") and ref[1:].isdigit():
        index = int(ref)
        if -len(runs) <= index < 0:
            return runs[index].dir
        raise StokerError(f"run {ref}: there are only {len(runs)} runs under {base}")
    exact = [r for r in runs if r.id == ref]
    if exact:
        return exact[0].dir
    matches = [r for r in runs if ref in r.id]
    if len(matches) == 1:
        return matches[0].dir
    if not matches:
        recent = ", ".join(r.id for r in runs[-5:])
        raise StokerError(f"no run {ref!r} under {base}; recent ones: {recent}")
    raise StokerError(
        f"{ref!r} matches {len(matches)} runs ({', '.join(r.id for r in matches[:5])}); "
        "give more of the id"
    )
