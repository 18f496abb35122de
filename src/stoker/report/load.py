"""Reading one run directory for the report: record, metrics as columns, doctor, timeline.

Everything is read through :mod:`stoker.safe_files` (regular files inside the run directory,
bounded), and everything read is untrusted text: the page escapes it. A missing directory, a
missing or garbage ``record.json`` or a garbage ``doctor.json`` is one
:class:`~stoker.errors.StokerError` line naming the file; a torn last line of
``metrics.jsonl`` (a killed run) is skipped, as every reader of it does.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stoker import safe_files
from stoker.errors import StokerError
from stoker.records.listing import effective_status
from stoker.records.record import METRICS, PATCH, RECORD, read_record

__all__ = ["Event", "Metric", "RunData", "load_run"]

DOCTOR = "doctor.json"
COMPRESSED = "compressed"
"""Where ``stoker compress`` writes its measurements of a run's model (``<label>.json``)."""
_COMPRESSED_FILES = 200  # more measurement files than any person made; the rest are ignored
METRICS_LIMIT = 2 << 30  # bytes: ~10M lines; more is not a file stoker wrote
PATCH_SHOWN = 1 << 20  # bytes of code.patch put in the page; the rest is cut with a note
_SOURCE_LIMIT = 4 << 20  # bytes of a source file read to show a finding's line
_STEP_DIR = re.compile(r"step-(\d+)")


@dataclass(slots=True)
class Metric:
    """One logged scalar: parallel float arrays (``steps`` NaN where no step was logged)."""

    name: str
    steps: np.ndarray
    times: np.ndarray
    """Seconds since the run's start (see :attr:`RunData.t0`)."""
    values: np.ndarray

    @property
    def breaks(self) -> list[int]:
        """Indices where the step goes back: a resumed attempt re-logging steps."""
        return (np.flatnonzero(np.diff(self.steps) < 0) + 1).tolist()

    @property
    def non_finite(self) -> int:
        return int((~np.isfinite(self.values)).sum())


@dataclass(frozen=True, slots=True)
class Event:
    """Something on the timeline: a checkpoint, an attempt starting, a resume, the end."""

    kind: str
    """``"start"``, ``"checkpoint"``, ``"resume"`` or ``"end"``."""
    step: float
    """The step it happened at (NaN: unknown)."""
    time: float
    """Seconds since the run's start (NaN: unknown)."""
    label: str


@dataclass(slots=True)
class RunData:
    """What the report shows about one run."""

    dir: Path
    id: str
    record: dict[str, Any]
    status: str
    metrics: dict[str, Metric] = field(default_factory=dict)
    doctor: dict[str, Any] | None = None
    patch: str = ""
    patch_cut: int = 0
    """Bytes of ``code.patch`` left out of the page."""
    events: list[Event] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)
    """A finding's ``file:line`` -> that line of the file, where it could be read."""
    t0: float | None = None
    """Unix time of wall-clock 0: the run's start (else its first logged metrics line)."""
    compression: list[dict[str, Any]] = field(default_factory=list)
    """``stoker compress`` measurements of this run's model: one row per form (the newest
    measurement of each name), see :func:`_read_compression`."""


def _parse_time(text: Any) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        return _dt.datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def _read_metrics(run_dir: Path, t0: float | None) -> tuple[dict[str, Metric], float | None]:
    """The numeric columns of ``metrics.jsonl``, times made relative to ``t0`` (default: the
    first logged line), and the ``t0`` used."""
    try:
        with safe_files.open_regular(run_dir / METRICS, root=run_dir, limit=METRICS_LIMIT) as f:
            data = f.read(METRICS_LIMIT + 1)
    except FileNotFoundError:
        return {}, None
    columns: dict[str, tuple[list[float], list[float], list[float]]] = {}
    decode = json.JSONDecoder().decode
    for n, line in enumerate(data.split(b"\n")):
        if not line:
            continue
        try:
            rec = decode(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            continue  # a torn last line, or not a line stoker wrote
        if not isinstance(rec, dict):
            continue
        step = rec.get("step")
        stamp = rec.get("time")
        s = float(step) if isinstance(step, int | float) and not isinstance(step, bool) else n
        t = (
            float(stamp)
            if isinstance(stamp, int | float) and not isinstance(stamp, bool)
            else math.nan
        )
        for key, value in rec.items():
            if key in ("step", "time") or isinstance(value, bool):
                continue
            if isinstance(value, int | float):
                col = columns.setdefault(str(key), ([], [], []))
                col[0].append(s)
                col[1].append(t)
                col[2].append(float(value))
    if t0 is None:
        firsts = [c[1][0] for c in columns.values() if c[1] and math.isfinite(c[1][0])]
        t0 = min(firsts) if firsts else None
    metrics = {}
    for key, (steps, times, values) in columns.items():
        seconds = np.asarray(times, dtype=np.float64)
        metrics[key] = Metric(
            name=key,
            steps=np.asarray(steps, dtype=np.float64),
            times=seconds - t0 if t0 is not None else seconds,
            values=np.asarray(values, dtype=np.float64),
        )
    return metrics, t0


def _read_doctor(run_dir: Path) -> dict[str, Any] | None:
    try:
        doc: dict[str, Any] = safe_files.read_json(run_dir / DOCTOR, expect=dict, root=run_dir)
    except FileNotFoundError:
        return None
    if not isinstance(doc.get("findings", []), list) or not isinstance(
        doc.get("summary", {}), dict
    ):
        raise StokerError(
            f"{run_dir / DOCTOR} has no findings list or summary object; it is not a file the "
            "doctor wrote (remove it to report the run without it)"
        )
    return doc


def _number(value: Any) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return float(value) if ok else math.nan


def _compression_row(item: Any, source: str) -> dict[str, Any] | None:
    """One form of ``stoker compress``'s JSON (``Evaluation.to_json``) as plain numbers."""
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        return None
    latency = item.get("latency_ms")
    if not isinstance(latency, dict):
        latency = {}
    medians = {
        int(b): _number(stats.get("median"))
        for b, stats in latency.items()
        if isinstance(b, str) and b.isdigit() and isinstance(stats, dict)
    }
    return {
        "name": item["name"][:200],
        "source": source,
        "file_mb": _number(item.get("file_bytes")) / 1e6,
        "params": _number(item.get("params")),
        "nonzero_params": _number(item.get("nonzero_params")),
        "latency_ms": dict(sorted(medians.items())),
        "tokens_per_second": _number(item.get("tokens_per_second")),
        "accuracy": _number(item.get("accuracy")),
        "perplexity": _number(item.get("perplexity")),
    }


def _read_compression(run_dir: Path) -> list[dict[str, Any]]:
    """Rows of ``compressed/*.json``, oldest file first, so that a form measured again (the
    fp32 baseline of every invocation) keeps its newest numbers. A file that is not a list of
    measurements is skipped: the report shows the rest."""
    directory = run_dir / COMPRESSED
    if directory.is_symlink() or not directory.is_dir():
        return []
    files = []
    for path in directory.glob("*.json"):
        try:
            files.append((path.stat().st_mtime, path))
        except OSError:
            continue
    rows: dict[str, dict[str, Any]] = {}
    for _, path in sorted(files)[-_COMPRESSED_FILES:]:
        try:
            items = safe_files.read_json(path, expect=list, root=run_dir)
        except (OSError, StokerError):
            continue
        for item in items:
            row = _compression_row(item, path.stem)
            if row is not None:
                rows.pop(row["name"], None)
                rows[row["name"]] = row
    return list(rows.values())


def _read_patch(run_dir: Path, record: dict[str, Any]) -> tuple[str, int]:
    if not (record.get("git") or {}).get("patch"):
        return "", 0
    try:
        with safe_files.open_regular(run_dir / PATCH, root=run_dir, limit=None) as f:
            data = f.read(PATCH_SHOWN + 1)
            size = f.seek(0, 2)
    except (OSError, StokerError):  # absent, or not a file the run wrote: shown as absent
        return "", 0
    cut = max(0, size - PATCH_SHOWN)
    return data[:PATCH_SHOWN].decode("utf-8", errors="replace"), cut


def _source_lines(record: dict[str, Any], doctor: dict[str, Any] | None) -> dict[str, str]:
    """The source line of each finding's ``file:line``: only a ``.py`` file inside the run's
    recorded working directory or repository (a crafted location naming another file is not
    read), only a regular file (see :mod:`stoker.safe_files`)."""
    if not doctor:
        return {}
    cwd = (record.get("command") or {}).get("cwd")
    repo = (record.get("git") or {}).get("repo")
    roots = [Path(r) for r in (cwd, repo) if isinstance(r, str) and r]
    out: dict[str, str] = {}
    for finding in doctor.get("findings") or []:
        loc = finding.get("location") if isinstance(finding, dict) else None
        if not isinstance(loc, str) or loc in out:
            continue
        name, _, number = loc.rpartition(":")
        if not name.endswith(".py") or not number.isdigit():
            continue
        for root in roots:
            path = Path(name) if Path(name).is_absolute() else root / name
            try:
                if not path.resolve().is_relative_to(root.resolve()):
                    continue
                text = safe_files.read_bytes(path, limit=_SOURCE_LIMIT, root=root)
            except (OSError, StokerError, ValueError):
                continue
            lines = text.decode("utf-8", errors="replace").splitlines()
            index = int(number) - 1
            if 0 <= index < len(lines):
                out[loc] = lines[index].strip()[:300]
            break
    return out


def _checkpoints(run_dir: Path, t0: float | None) -> list[Event]:
    """``checkpoints/step-N/`` directories with a manifest (a complete save), by step; the
    manifest's ``created`` time places them on the wall-clock axis."""
    directory = run_dir / "checkpoints"
    if directory.is_symlink() or not directory.is_dir():
        return []
    events = []
    for child in sorted(directory.iterdir()):
        m = _STEP_DIR.fullmatch(child.name)
        if not m or child.is_symlink() or not child.is_dir():
            continue
        try:
            manifest = safe_files.read_json(child / "manifest.json", expect=dict, root=directory)
        except (OSError, StokerError):
            continue  # never completed (no manifest) or not written by stoker
        created = _parse_time(manifest.get("created"))
        t = created - t0 if created is not None and t0 is not None else math.nan
        events.append(Event("checkpoint", float(m.group(1)), t, f"checkpoint {child.name}"))
    return sorted(events, key=lambda e: e.step)


def _attempts(record: dict[str, Any], t0: float | None, status: str) -> list[Event]:
    events = []
    attempts = [a for a in record.get("attempts") or [] if isinstance(a, dict)]
    for i, attempt in enumerate(attempts):
        started = _parse_time(attempt.get("started"))
        t = started - t0 if started is not None and t0 is not None else math.nan
        resumed = attempt.get("resumed_from")
        if isinstance(resumed, dict):
            step = resumed.get("step")
            changed = resumed.get("changed") or {}
            what = ", ".join(str(k) for k in changed) if isinstance(changed, dict) else ""
            label = f"attempt {i + 1} resumed from step {step}" + (
                f" (changed: {what})" if what else ""
            )
            s = float(step) if isinstance(step, int | float) else math.nan
            events.append(Event("resume", s, t, label))
        elif i > 0:
            events.append(Event("start", math.nan, t, f"attempt {i + 1} started from scratch"))
    ended = _parse_time(record.get("ended"))
    if status in ("failed", "killed"):
        error = record.get("error") or {}
        why = f": {error.get('type') or ''} {error.get('message') or ''}".rstrip() if error else ""
        t = ended - t0 if ended is not None and t0 is not None else math.nan
        steps = (record.get("summary") or {}).get("steps")
        s = float(steps) if isinstance(steps, int | float) else math.nan
        events.append(Event("end", s, t, f"run {status}{why}"))
    elif status == "preempted":
        where = record.get("preempted") or {}
        t = ended - t0 if ended is not None and t0 is not None else math.nan
        step = where.get("step")
        s = float(step) if isinstance(step, int | float) else math.nan
        events.append(Event("end", s, t, f"run preempted by {where.get('signal')} at step {step}"))
    return events


def load_run(run_dir: str | Path) -> RunData:
    """Read what the report shows about ``run_dir``; one-line :class:`StokerError` if it is not
    a readable run directory."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise StokerError(f"{run_dir}: no such run directory; pass a run directory or a run id")
    if not run_dir.is_dir():
        raise StokerError(f"{run_dir} is not a directory; pass a run directory (runs/<id>/)")
    try:
        record = read_record(run_dir)
    except FileNotFoundError:
        raise StokerError(
            f"{run_dir} has no {RECORD}: it is not a stoker run directory (pass runs/<id>/)"
        ) from None
    except OSError as exc:
        raise StokerError(f"cannot read {run_dir / RECORD}: {exc.strerror or exc}") from None
    # Wall-clock is counted from the run's start (setup included), else its first metric.
    metrics, t0 = _read_metrics(run_dir, _parse_time(record.get("started")))
    doctor = _read_doctor(run_dir)
    patch, cut = _read_patch(run_dir, record)
    status = effective_status(record)
    events = _checkpoints(run_dir, t0) + _attempts(record, t0, status)
    return RunData(
        dir=run_dir,
        id=str(record.get("id") or run_dir.name),
        record=record,
        status=status,
        metrics=metrics,
        doctor=doctor,
        patch=patch,
        patch_cut=cut,
        events=events,
        sources=_source_lines(record, doctor),
        t0=t0,
        compression=_read_compression(run_dir),
    )
