"""``stoker reproduce ID``: re-run a recorded run at its recorded code; compare its metrics."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from stoker.cli._checks import check_number
from stoker.records.listing import find_run
from stoker.records.reproduce import reproduce

NAME = "reproduce"
HELP = "re-run a recorded run from its git revision + code.patch in a temporary worktree"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("id", help="run id, a unique part of it, a path, or -1 for the latest")
    parser.add_argument("--root", default=None, help="directory of run directories (./runs)")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.0,
        help="largest accepted |difference| of any logged metric (default 0: exact)",
    )
    parser.add_argument("--keep-worktree", action="store_true", help="keep the checkout")
    parser.add_argument("--timeout", type=float, default=None, help="seconds before giving up")


def main(args: argparse.Namespace) -> int:
    check_number("--timeout", args.timeout, unit="seconds", example="3600")
    check_number("--tolerance", args.tolerance, unit="difference", example="1e-6", zero=True)
    console = Console()
    run_dir = find_run(args.id, args.root)
    result = reproduce(
        run_dir,
        tolerance=args.tolerance,
        keep_worktree=args.keep_worktree,
        timeout_s=args.timeout,
        echo=lambda text: console.print(text, highlight=False, markup=False),
    )
    if result.returncode != 0:
        console.print(f"[red]the reproduction exited with code {result.returncode}[/]")
        return 1
    if not result.metrics:
        console.print("the two runs share no logged metric; nothing to compare")
        return 1
    table = Table(title=f"{run_dir.name}: original vs reproduction", title_justify="left")
    for column in ("metric", "original (final)", "reproduced (final)", "max |diff|", "steps"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for m in result.metrics:
        ok = m.max_abs_diff <= args.tolerance
        table.add_row(
            m.key,
            f"{m.original:.10g}" if m.original is not None else "-",
            f"{m.reproduced:.10g}" if m.reproduced is not None else "-",
            f"[{'green' if ok else 'red'}]{m.max_abs_diff:.3g}[/]",
            str(m.steps_compared),
        )
    console.print(table)
    verdict = "reproduced" if result.matches else "NOT reproduced"
    console.print(f"{verdict} (tolerance {args.tolerance:g}); new run in {result.reproduction}")
    return 0 if result.matches else 1
