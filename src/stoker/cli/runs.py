"""``stoker runs``: list recorded runs; ``runs show ID``; ``runs diff A B``."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from stoker.errors import StokerError
from stoker.records.diff import diff_runs, flatten
from stoker.records.listing import RunInfo, find_run, list_runs, run_info, tail_metrics
from stoker.records.record import read_record
from stoker.report import write_index

NAME = "runs"
HELP = "list recorded runs (./runs), show one, or diff two: config, code and packages"

_STATUS_STYLE = {
    "running": "cyan",
    "finished": "green",
    "failed": "red",
    "killed": "yellow",
    "preempted": "magenta",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--root",
        default=None,
        help="directory of run directories (default $STOKER_RUNS_DIR or ./runs)",
    )
    # A flag, not an optional value: `--html show ID` must not read "show" as a file name.
    parser.add_argument(
        "--html",
        action="store_true",
        help="write an HTML index of the runs linking each run's report (writing the reports "
        "that are missing or stale)",
    )
    parser.add_argument(
        "-o", "--output", default=None, metavar="FILE", help="--html: where (ROOT/index.html)"
    )
    sub = parser.add_subparsers(dest="runs_command", metavar="{show,diff}")
    show = sub.add_parser("show", help="everything recorded about one run")
    show.add_argument("id", help="run id, a unique part of it, a path, or -1 for the latest")
    show.add_argument("--json", action="store_true", help="print record.json as is")
    diff = sub.add_parser("diff", help="config, code, package and environment differences")
    diff.add_argument("a", help="first run (id, unique part, path, -2, ...)")
    diff.add_argument("b", help="second run")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = round(seconds)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def _local(when: _dt.datetime | None) -> str:
    return when.astimezone().strftime("%Y-%m-%d %H:%M") if when else "-"


def _status(info: RunInfo) -> str:
    style = _STATUS_STYLE.get(info.status, "")
    inferred = info.status == "killed" and info.record.get("status") == "running"
    text = info.status + ("?" if inferred else "")
    return f"[{style}]{text}[/]" if style else text


def _skipped(run_dir: Path, why: str) -> None:
    print(f"stoker: warning: skipped {run_dir}: {why}", file=sys.stderr)


def _list(console: Console, root: str | None) -> int:
    runs = list_runs(root, on_skip=_skipped)
    if not runs:
        console.print(f"no runs under {root or 'runs'} (runs are recorded by stoker.records)")
        return 0
    table = Table(title=f"runs in {runs[0].dir.parent}", title_justify="left")
    for column in ("id", "name", "started", "status", "steps", "last loss", "duration"):
        table.add_column(column, justify="right" if column in ("steps", "last loss") else "left")
    for r in runs:
        table.add_row(
            r.id,
            r.name,
            _local(r.started),
            _status(r),
            "-" if r.steps is None else str(r.steps),
            "-" if r.last_loss is None else f"{r.last_loss:.4g}",
            _duration(r.duration_s),
        )
    console.print(table)
    if any(r.status == "killed" and r.record.get("status") == "running" for r in runs):
        console.print("killed? = recorded as running, but its process is gone (e.g. SIGKILL)")
    return 0


def _show(console: Console, ref: str, root: str | None, as_json: bool) -> int:
    run_dir = find_run(ref, root)
    record = read_record(run_dir)
    if as_json:
        console.print_json(json.dumps(record))
        return 0
    info = run_info(run_dir)
    git = record.get("git") or {}
    cmd = record.get("command") or {}
    rows: list[tuple[str, Any]] = [
        ("id", info.id),
        ("directory", str(run_dir)),
        ("status", _status(info)),
        ("started", _local(info.started)),
        ("duration", _duration(info.duration_s)),
        ("steps", info.steps),
        ("last loss", info.last_loss),
        ("command", " ".join(cmd.get("orig_argv") or cmd.get("argv") or [])),
        ("cwd", cmd.get("cwd")),
        (
            "git",
            f"{git.get('revision') or '-'} ({git.get('branch') or 'detached'})"
            + (f", dirty: {git.get('patch')}" if git.get("dirty") else ", clean")
            if git
            else "-",
        ),
        ("world size", record.get("world_size")),
        ("host", (record.get("host") or {}).get("hostname")),
        ("cpu", (record.get("host") or {}).get("cpu")),
        (
            "gpus",
            ", ".join(g.get("name", "?") for g in (record.get("host") or {}).get("gpus", []))
            or "-",
        ),
        ("versions", ", ".join(f"{k} {v}" for k, v in (record.get("versions") or {}).items() if v)),
        ("attempts", len(record.get("attempts") or [])),
    ]
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, "-" if value is None else str(value))
    for section in ("config", "settings", "seeds"):
        for key, value in flatten(record.get(section) or {}).items():
            table.add_row(f"{section}.{key}", json.dumps(value))
    _, last = tail_metrics(run_dir)
    for key, value in (last or (record.get("summary") or {}).get("last") or {}).items():
        table.add_row(f"metric.{key}", str(value))
    error = record.get("error")
    if error:
        table.add_row("error", f"[red]{error.get('type') or ''}: {error.get('message')}[/]")
    console.print(table)
    return 0


def _diff(console: Console, a: str, b: str, root: str | None) -> int:
    dir_a, dir_b = find_run(a, root), find_run(b, root)
    result = diff_runs(dir_a, dir_b)
    console.print(f"[bold]{result.a}[/] -> [bold]{result.b}[/]")
    if result.identical:
        console.print("no differences in config, code, packages or environment")
        return 0
    for section, changes in result.sections.items():
        if not changes:
            continue
        console.print(f"\n[bold]{section}[/] ({len(changes)} changed)")
        for c in changes:
            console.print(
                f"  {c.key}: {json.dumps(c.a, default=str)} -> {json.dumps(c.b, default=str)}",
                highlight=False,
                markup=False,
            )
    console.print(f"\n[bold]code[/] ({result.code_note})")
    if result.code:
        for line in result.code.splitlines():
            style = "green" if line.startswith("+") else "red" if line.startswith("-") else None
            console.print(line, style=style, highlight=False, markup=False)
    else:
        console.print("  identical")
    return 0


def main(args: argparse.Namespace) -> int:
    console = Console()
    command = getattr(args, "runs_command", None)
    if args.html and command is not None:
        raise StokerError(
            f"--html writes the index of all runs; drop it for `stoker runs {command}`, or use "
            "`stoker report RUN` for one run's report"
        )
    if args.output is not None and not args.html:
        raise StokerError("-o/--output names the --html index; add --html")
    if command == "show":
        return _show(console, args.id, args.root, args.json)
    if command == "diff":
        return _diff(console, args.a, args.b, args.root)
    if args.html:
        path = write_index(args.root, args.output)
        console.print(f"wrote {path}", highlight=False)
        return 0
    return _list(console, args.root)
