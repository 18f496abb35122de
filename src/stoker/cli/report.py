"""``stoker report RUN [RUN ...] [-o FILE]``: the self-contained HTML report of runs."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from stoker.records.listing import find_run
from stoker.report import write_report

NAME = "report"
HELP = "write one self-contained HTML file (opens offline) of one run, or several overlaid"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "runs",
        nargs="+",
        metavar="RUN",
        help="run directory, run id, a unique part of it, or -1 for the latest; several are "
        "overlaid and compared with the first",
    )
    parser.add_argument(
        "-o",
        "--output",
        default=None,
        help="the HTML file to write (default RUN/report.html for one run, ./report.html for "
        "several)",
    )
    parser.add_argument("--root", default=None, help="directory of run directories (./runs)")


def _resolve(ref: str, root: str | None) -> Path:
    # A path is taken as given (a missing one is named as such by the report); anything else
    # is looked up among the runs under --root.
    if os.sep in ref or ref.startswith(".") or Path(ref).exists():
        return Path(ref)
    return find_run(ref, root)


def main(args: argparse.Namespace) -> int:
    dirs = [_resolve(ref, args.root) for ref in args.runs]
    path = write_report(dirs, args.output)
    print(f"wrote {path}")
    return 0
