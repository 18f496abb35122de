"""``stoker runs --html``: an index page of every run under a runs directory, linking reports.

Each run's ``report.html`` is (re)written first when it is missing or older than the files it
shows, so every link works; a run whose report cannot be written is listed with the reason
instead of stopping the index.
"""

from __future__ import annotations

import datetime as _dt
import os
from html import escape
from pathlib import Path
from urllib.parse import quote

from stoker import __version__
from stoker.errors import StokerError
from stoker.records.listing import RunInfo, list_runs
from stoker.records.rundir import runs_root
from stoker.report.markup import CSP, duration
from stoker.report.write import REPORT, write_atomic, write_report

__all__ = ["INDEX", "write_index"]

INDEX = "index.html"
_SHOWN = ("record.json", "metrics.jsonl", "doctor.json", "checkpoints")


def _stale(run_dir: Path) -> bool:
    report = run_dir / REPORT
    try:
        written = report.stat().st_mtime
    except OSError:
        return True
    for name in _SHOWN:
        try:
            if (run_dir / name).stat().st_mtime > written:
                return True
        except OSError:
            continue
    return False


def _row(info: RunInfo, out_dir: Path) -> str:
    e = escape
    error = ""
    if _stale(info.dir):
        try:
            write_report([info.dir])
        except StokerError as exc:
            error = str(exc)
    report = info.dir / REPORT
    if report.is_file() and not error:
        href = quote(os.path.relpath(report, out_dir))
        link = f'<a href="{e(href, quote=True)}">{e(info.id)}</a>'
    else:
        link = f"{e(info.id)}<br><small>no report: {e(error or 'not written')}</small>"
    started = info.started.astimezone().strftime("%Y-%m-%d %H:%M") if info.started else "-"
    cells = [
        link,
        e(info.name),
        f'<span class="status-{e(info.status, quote=True)}">{e(info.status)}</span>',
        e(started),
        "-" if info.steps is None else str(info.steps),
        "-" if info.last_loss is None else f"{info.last_loss:.4g}",
        e(duration(info.duration_s)),
    ]
    return "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def write_index(
    root: str | os.PathLike[str] | None = None, out: str | os.PathLike[str] | None = None
) -> Path:
    """Write an index of the runs under ``root`` (default ``$STOKER_RUNS_DIR`` or ./runs) to
    ``out`` (default ``<root>/index.html``); returns the path written."""
    base = runs_root(None if root is None else Path(root))
    if not base.is_dir():
        raise StokerError(f"no runs directory {base}; pass --root DIR where the runs are")
    path = Path(out) if out is not None else base / INDEX
    if path.is_dir():
        path = path / INDEX
    if not path.parent.is_dir():
        raise StokerError(f"cannot write the index to {path}: {path.parent} is not a directory")
    runs = list_runs(base)
    rows = "".join(_row(r, path.parent.resolve()) for r in reversed(runs))  # newest first
    header = "".join(
        f"<th>{h}</th>"
        for h in ("run", "name", "status", "started", "steps", "last loss", "duration")
    )
    now = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    title = f"stoker runs in {base}"
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        f"<title>{escape(title)}</title><style>"
        "body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#1d2433}"
        "table{border-collapse:collapse}td,th{border:1px solid #e1e4e8;padding:3px 8px;"
        "text-align:left}th{background:#eef0f3}.status-finished{color:#22863a}"
        ".status-failed,.status-killed{color:#b31d28}.status-preempted{color:#b08800}"
        "small{color:#b31d28}"
        f"</style></head><body><h1>{escape(title)}</h1>"
        f"<p>{len(runs)} runs; written {escape(now)} by stoker {escape(__version__)}</p>"
        f"<table><tr>{header}</tr>{rows}</table></body></html>\n"
    )
    write_atomic(path, page)
    return path
