"""``write_report(run_dirs, out)``: read the runs, render the page, write it atomically.

Safe to call at the end of every run: it reads only through :mod:`stoker.safe_files` (nothing
it reads can block it or grow without bound), runs no subprocess for one run (comparing
several runs' code asks git, see :func:`stoker.records.diff.diff_runs`), and replaces ``out``
in one rename, so a reader never sees half a page. A 100k-step run takes well under a second
(``benchmarks/report.py``).
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Sequence
from pathlib import Path

from stoker import __version__
from stoker.errors import StokerError
from stoker.records.diff import diff_runs
from stoker.report.load import load_run
from stoker.report.page import render_page

__all__ = ["REPORT", "write_atomic", "write_report"]

REPORT = "report.html"
"""The report's name inside a run directory (``runs/<id>/report.html``)."""


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StokerError(
            f"cannot write the report to {path}: {exc.strerror or exc}; pass -o with a "
            "writable path"
        ) from None


def _output(path: Path) -> Path:
    if path.is_dir():
        path = path / REPORT
    if not path.parent.is_dir():
        raise StokerError(
            f"cannot write the report to {path}: {path.parent} is not a directory; create it "
            "or pass another -o"
        )
    return path


def write_report(
    run_dirs: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
) -> Path:
    """Write the HTML report of ``run_dirs`` (one run directory or several) to ``out``.

    ``out`` defaults to ``<run>/report.html`` for one run and ``./report.html`` for several;
    a directory means ``report.html`` inside it. Returns the path written. A run directory
    that cannot be read is one :class:`~stoker.errors.StokerError` line naming it.
    """
    if isinstance(run_dirs, str | os.PathLike):
        run_dirs = [run_dirs]
    if not run_dirs:
        raise StokerError("write_report() needs at least one run directory")
    path = None if out is None else _output(Path(out))  # refused before any work
    runs = [load_run(Path(d)) for d in run_dirs]
    diffs = [diff_runs(runs[0].dir, r.dir) for r in runs[1:]]
    if path is None:
        path = _output(runs[0].dir / REPORT if len(runs) == 1 else Path(REPORT))
    now = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    page = render_page(runs, diffs, generated=f"written {now} by stoker {__version__}")
    write_atomic(path, page)
    return path
