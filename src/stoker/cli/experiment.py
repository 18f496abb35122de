"""``stoker experiment NAME``: run one of the built-in experiments and write its report."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from stoker.cli._checks import check_number

NAME = "experiment"
HELP = "run a built-in experiment (train-large-then-compress) and write its report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=["train-large-then-compress"])
    parser.add_argument(
        "--budget-minutes",
        type=float,
        default=5.0,
        help="training wall-clock per model size (3 sizes; the whole run takes ~30 min at 5)",
    )
    parser.add_argument(
        "--sizes", default="tiny,mini,small", help="comma-separated, smallest first"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("docs/experiments/train-large-then-compress")
    )
    parser.add_argument("--quick", action="store_true", help="seconds, for tests: not a result")


def main(args: argparse.Namespace) -> int:
    from stoker.experiments import ExperimentConfig, run_experiment

    check_number("--budget-minutes", args.budget_minutes, unit="minutes", example="5")
    sizes = tuple(s.strip() for s in args.sizes.split(",") if s.strip())
    if args.quick:
        cfg = ExperimentConfig.quick_config(args.out)
        cfg = ExperimentConfig(**{**cfg.__dict__, "sizes": sizes})
    else:
        cfg = ExperimentConfig(out=args.out, sizes=sizes, budget_seconds=60 * args.budget_minutes)
    console = Console(stderr=True)
    report = run_experiment(cfg, console)
    console.print(f"wrote {report} (and its plots and results.json)")
    return 0
