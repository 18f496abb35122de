"""``stoker tune lr | batch-size | threads``: finders measured on a job's own step.

Without ``--job`` they measure the built-in MLM job (``examples/train_mlm.py``'s model, data
and optimizer); ``--job train.py:make_job`` measures yours (see :mod:`stoker.tune.job`). Each
prints its measurements as a table with the recommendation marked, and records them in a run
record (``runs/<time>-tune-<what>/record.json``, field ``tune``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from stoker.cli._checks import check_count, check_number
from stoker.errors import StokerError

NAME = "tune"
HELP = "measure the best learning rate, batch size or threads on your step (or the built-in job)"

_WHAT = ("lr", "batch-size", "threads")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", choices=_WHAT, help="what to find")
    parser.add_argument(
        "--job",
        default=None,
        metavar="SCRIPT.py:FUNCTION",
        help="a function returning a tune job (default: the built-in MLM job)",
    )
    parser.add_argument(
        "--max-seconds", type=float, default=120.0, help="time bound of the search (default 120)"
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps per candidate")
    parser.add_argument(
        "--candidates",
        default=None,
        metavar="N,N,...",
        help="batch-size: sizes to try (default powers of two); threads: thread counts",
    )
    parser.add_argument(
        "--workers", default="0,1,2", metavar="N,N,...", help="threads: DataLoader workers to try"
    )
    parser.add_argument(
        "--margin",
        type=float,
        default=0.0,
        help="batch-size: recommend the smallest size this close to the fastest (default 0: "
        "the fastest measured; 0.05 trades up to 5%% speed for a smaller batch)",
    )
    parser.add_argument(
        "--lr-scaling", default="sqrt", choices=("sqrt", "linear"), help="batch-size: LR rule"
    )
    parser.add_argument("--min-lr", type=float, default=1e-6, help="lr: scan start")
    parser.add_argument("--max-lr", type=float, default=1.0, help="lr: scan end")
    parser.add_argument(
        "--rule",
        default="min",
        choices=("min", "min/10", "steepest"),
        help="lr: how the suggestion is read off the curve (default %(default)s)",
    )
    parser.add_argument("--plot", default=None, metavar="PATH", help="lr: PNG path")
    parser.add_argument("--no-record", action="store_true", help="don't write a run record")


def _ints(flag: str, text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise StokerError(f"{flag} {text!r}: pass comma-separated integers, e.g. 8,16,32") from None
    if not values:
        raise StokerError(f"{flag} {text!r}: pass comma-separated integers, e.g. 8,16,32")
    return values


def _print_table(title: str, header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> None:
    table = Table(title=title)
    for name in header:
        table.add_column(name, justify="right")
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def main(args: argparse.Namespace) -> int:
    from stoker import tune

    check_number("--max-seconds", args.max_seconds, unit="seconds", example="120")
    check_count("--steps", args.steps, least=1, what="timed step")
    candidates = _ints("--candidates", args.candidates)
    workers = _ints("--workers", args.workers)
    job = tune.load_job(args.job) if args.job else tune.MLMJob()
    found: dict[str, Any]
    plot_path = None
    if args.what == "lr":
        kwargs: dict[str, Any] = {"min_lr": args.min_lr, "max_lr": args.max_lr, "rule": args.rule}
        if args.steps:
            kwargs["steps"] = args.steps
        lr = tune.tune_lr(job, max_seconds=args.max_seconds, **kwargs)
        print(
            f"LR range test: {len(lr.lrs)} steps from {lr.lrs[0]:.2e} to {lr.lrs[-1]:.2e} "
            f"(stopped: {lr.stopped}); lowest smoothed loss {min(lr.losses):.3f} at "
            f"{lr.minimum:.2e}; steepest descent at {lr.steepest:.2e}"
        )
        print(f"suggested one-cycle peak LR ({lr.rule}): {lr.suggestion:.3g}")
        if lr.stopped == "time":
            print(
                f"stoker tune: the scan stopped at --max-seconds {args.max_seconds:g} before "
                f"--max-lr {args.max_lr:g}: the suggestion only covers the LRs it reached; "
                f"raise --max-seconds or lower --steps"
            )
        found = {
            "lr": {
                "suggestion": lr.suggestion,
                "rule": lr.rule,
                "minimum": lr.minimum,
                "steepest": lr.steepest,
                "stopped": lr.stopped,
                "lrs": lr.lrs,
                "losses": lr.losses,
            }
        }
        plot_path = args.plot
    elif args.what == "batch-size":
        kwargs = {"margin": args.margin, "lr_scaling": args.lr_scaling}
        if candidates:
            kwargs["candidates"] = candidates
        if args.steps:
            kwargs["steps"] = args.steps
        bs = tune.tune_batch_size(job, max_seconds=args.max_seconds, **kwargs)
        _print_table(
            f"batch size (stopped: {bs.stopped}; samples/s from the median step over the scan "
            f"and {bs.rounds} interleaved round(s))",
            ("batch size", "samples/s", "memory MiB", "status"),
            bs.table(),
        )
        lr_note = (
            f"; LR {bs.lr:.3g} ({args.lr_scaling} scaling from {job.lr:g} at {job.batch_size})"
            if bs.lr is not None
            else ""
        )
        within = f" (the smallest within {args.margin:.0%} of it)" if args.margin else ""
        pick = f"recommended batch size: {bs.recommended}{within}"
        print(f"fastest measured: {bs.best}; {pick}{lr_note}")
        found = {
            "batch_size": {
                "best": bs.best,
                "recommended": bs.recommended,
                "lr": bs.lr,
                "stopped": bs.stopped,
                "rounds": bs.rounds,
                "trials": [list(row) for row in bs.table()],
            }
        }
    else:
        kwargs = {"workers": workers}
        if candidates:
            kwargs["threads"] = candidates
        if args.steps:
            kwargs["steps"] = args.steps
        th = tune.tune_threads(job, max_seconds=args.max_seconds, **kwargs)
        _print_table("threads x workers", ("threads", "workers", "ms/step", "status"), th.table())
        print(f"recommended: torch.set_num_threads({th.threads}), num_workers={th.workers}")
        found = {
            "threads": {
                "threads": th.threads,
                "workers": th.workers,
                "trials": [list(row) for row in th.table()],
            }
        }
    if args.no_record:
        if plot_path and args.what == "lr":
            _plot(lr, plot_path)
        return 0
    from stoker.records import RecordConfig, start_run

    run = start_run(RecordConfig(name=f"tune-{args.what}", tee_console=False))
    try:
        if args.what == "lr":
            written = _plot(lr, plot_path or run.dir / "lr_range.png")
            if written:
                found["lr"]["plot"] = str(written)
        run.update(tune=found)
    finally:
        run.finish()
    print(f"recorded in {run.dir}")
    return 0


def _plot(result: Any, path: Any) -> Any:
    try:
        written = result.plot(path)
    except StokerError as exc:  # matplotlib missing: the number matters more than the picture
        print(f"stoker tune: no plot: {exc}")
        return None
    print(f"wrote {written}")
    return written
