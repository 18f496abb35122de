"""Time to accuracy on the default MLM: the plain recipe against one-cycle, warm-up-stable-decay,
sequence-length warm-up, the finders' batch size and threads, and all of them together (issue 15).

The target is the plain recipe's own last validation accuracy on its curve (the lower of its
seeds', so every plain run reaches it): ``examples/train_mlm.py`` with today's defaults (warm-up +
cosine over ``--steps``). Every run validates on ``--eval-batches`` batches every ``--eval-every``
steps (that time is not counted); a run's *time to target* is its training wall time at the
first validation at or above the target. The other variants are laid out over
``--fraction`` of the plain run's tokens (a shorter schedule is what can reach the target
sooner); ``plain-short`` is the control (the plain recipe over the same shorter schedule), so
what a technique adds beyond a shorter schedule shows. Variants:

- ``plain``: the defaults, ``--steps`` steps;
- ``plain-short``: the defaults over ``fraction x steps``;
- ``one-cycle``: ``--schedule one-cycle``, peak = the LR finder's (``stoker tune lr``,
  ``--lr-rule``, by default the smoothed loss's minimum), short;
- ``wsd``: ``--schedule wsd`` (warm-up, stable, linear decay over the last 20%) at the LR
  finder's peak, short;
- ``seq-warmup``: ``--seq-warmup 0.3`` (rows of 32, 64, then 128 tokens), short;
- ``finders``: the LR finder's peak, and the batch size (that LR scaled by sqrt) and
  threads x workers that ``stoker tune batch-size`` / ``stoker tune threads`` recommend here,
  short (same tokens);
- ``all``: ``--recipe fast`` with the finders' settings (``--recipe fast`` was one-cycle +
  sequence-length warm-up in the first full run; sequence-length warm-up over cosine in the
  second; sequence-length warm-up over warm-up-stable-decay since a 4-seed comparison, see the
  README).

Finders run once, first (their time is reported, not added). ``--seeds`` seeds each,
interleaved (seed 0 in variant order, seed 1 reversed, ...). Ratios are time to target over the
plain run's of the same seed, then averaged. Acceptance (issue 15): ``all`` <= 0.6x plain.

    python benchmarks/time_to_accuracy.py            # full run: ~30 min (Zen 5), ~85 min (Zen 3)
    python benchmarks/time_to_accuracy.py --quick    # smoke test (tiny steps; no claims)
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from stoker.bench import Bench, bench_parser
from stoker.tune.lr import LR_RULES

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_mlm.py"
TARGET_RATIO = 0.6
VARIANTS = ("plain", "plain-short", "one-cycle", "wsd", "seq-warmup", "finders", "all")


def _train_mlm() -> Any:
    spec = importlib.util.spec_from_file_location("train_mlm", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def find_settings(args: Any, quick: bool) -> dict[str, Any]:
    """Run the LR, batch-size and threads finders on the built-in MLM job (bounded)."""
    from stoker.tune import MLMJob, scale_lr, tune_batch_size, tune_lr, tune_threads

    job = MLMJob(batch_size=args.batch_size, lr=args.lr)
    began = time.perf_counter()
    # As `stoker tune lr --rule ...` runs it (1e-6 to 1 over 100 steps).
    found_lr = tune_lr(
        job, steps=10 if quick else 100, rule=args.lr_rule, max_seconds=args.finder_seconds
    )
    sizes = [4, 8] if quick else [16, 32, 64, 128]
    bs = tune_batch_size(
        job, candidates=sizes, steps=1 if quick else 3, max_seconds=args.finder_seconds
    )
    cores = os.cpu_count() or 1
    threads = sorted({1, cores})
    th = tune_threads(
        job,
        threads=threads,
        workers=(0,) if quick else (0, 1),
        steps=1 if quick else 4,
        warmup=1 if quick else 2,
        max_seconds=args.finder_seconds,
    )
    return {
        "batch_size": bs.recommended,
        # The LR finder's peak, at the plain batch size; scaled as the batch-size finder says.
        "lr": scale_lr(found_lr.suggestion, args.batch_size, bs.recommended),
        "lr_finder": {
            "suggestion": found_lr.suggestion,
            "rule": found_lr.rule,
            "minimum": found_lr.minimum,
            "steepest": found_lr.steepest,
            "stopped": found_lr.stopped,
        },
        "threads": th.threads,
        "workers": th.workers,
        "batch_trials": [list(r) for r in bs.table()],
        "thread_trials": [list(r) for r in th.table()],
        "seconds": time.perf_counter() - began,
    }


def variant_argv(name: str, args: Any, found: dict[str, Any]) -> list[str]:
    """``train_mlm.py`` arguments of one variant (besides seed and evaluation)."""
    short = max(2, round(args.fraction * args.steps))
    base = ["--batch-size", str(args.batch_size), "--lr", str(args.lr)]
    if name == "plain":
        return [*base, "--steps", str(args.steps)]
    if name == "plain-short":
        return [*base, "--steps", str(short)]
    if name in ("one-cycle", "wsd"):  # at the LR finder's peak (the batch size is the plain one)
        peak = f"{found['lr_finder']['suggestion']:.6g}"
        return [*base[:2], "--lr", peak, "--steps", str(short), "--schedule", name]
    if name == "seq-warmup":
        return [*base, "--steps", str(short), "--seq-warmup", "0.3"]
    b = found["batch_size"]
    tuned = [
        "--batch-size", str(b), "--lr", f"{found['lr']:.6g}",
        "--threads", str(found["threads"]), "--workers", str(found["workers"]),
        "--steps", str(max(2, round(short * args.batch_size / b))),
    ]  # fmt: skip
    return tuned if name == "finders" else [*tuned, "--recipe", "fast"]


def eval_every(argv: list[str], args: Any) -> int:
    """Validate at the same token counts whatever the batch size."""
    b = int(argv[argv.index("--batch-size") + 1])
    return max(1, round(args.eval_every * args.batch_size / b))


def time_to(target: float, evals: list[list[float]]) -> float | None:
    """Training seconds at the first validation reaching ``target`` (None: never)."""
    for _, seconds, accuracy in evals:
        if accuracy >= target:
            return float(seconds)
    return None


def main() -> int:
    parser = bench_parser(__doc__.split("\n")[0], warmup=0, repeats=2)
    parser.add_argument("--steps", type=int, default=None, help="plain run's steps (1500)")
    parser.add_argument("--fraction", type=float, default=0.6, help="short schedules' share")
    parser.add_argument("--batch-size", type=int, default=None, help="plain batch size (32)")
    parser.add_argument("--lr", type=float, default=2e-3, help="plain peak LR")
    parser.add_argument("--eval-every", type=int, default=None, help="steps at batch size 32")
    parser.add_argument("--eval-batches", type=int, default=None, help="validation batches")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--finder-seconds", type=float, default=None, help="bound per finder")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    parser.add_argument(
        "--lr-rule",
        default="min",
        choices=LR_RULES,
        help="how the LR finder's peak is read (%(default)s; see stoker.tune.lr)",
    )
    args = parser.parse_args()
    quick = args.quick
    args.steps = args.steps or (12 if quick else 1500)
    args.batch_size = args.batch_size or (8 if quick else 32)
    args.eval_every = args.eval_every or (4 if quick else 75)
    args.eval_batches = args.eval_batches or (2 if quick else 25)
    args.finder_seconds = args.finder_seconds or (20.0 if quick else 60.0)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or "plain" not in variants:
        parser.error(f"--variants {args.variants}: need plain; valid: {', '.join(VARIANTS)}")

    # No doctor (its profiled window and probes would land in the timed training) and run
    # records in a scratch directory.
    os.environ["STOKER_DOCTOR"] = "0"
    os.environ["STOKER_RUNS_DIR"] = tempfile.mkdtemp(prefix="stoker-tta-runs-")
    meta: dict[str, Any] = {k: getattr(args, k) for k in (
        "steps", "fraction", "batch_size", "lr", "eval_every", "eval_batches", "seeds",
        "finder_seconds", "lr_rule")}  # fmt: skip
    bench = Bench.from_args("time_to_accuracy", args, meta=meta)
    console = bench.console
    train_mlm = _train_mlm()
    threads_before = torch.get_num_threads()

    found: dict[str, Any] = {"batch_size": args.batch_size, "lr": args.lr, "threads": 0,
                             "workers": 0}  # fmt: skip
    if {"one-cycle", "wsd", "finders", "all"} & set(variants):
        found = find_settings(args, quick)
        torch.set_num_threads(threads_before)
    meta["finders"] = found

    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for seed in range(args.seeds):
        order = variants if seed % 2 == 0 else variants[::-1]
        for name in order:
            argv = variant_argv(name, args, found)
            argv += [
                "--seed", str(seed), "--budget-minutes", "0", "--log-every", "1000000",
                "--eval-every", str(eval_every(argv, args)),
                "--eval-batches", str(args.eval_batches),
            ]  # fmt: skip
            if console is not None:
                console.print(f"[bold]{name}[/bold] seed {seed}: {' '.join(argv)}")
            result = train_mlm.main(argv)
            torch.set_num_threads(threads_before)  # a variant's --threads must not leak
            evals = [list(e) for e in result["evals"]]
            if not evals or evals[-1][0] != result["steps"]:  # the final validation counts
                evals.append([result["steps"], result["train_seconds"], result["val_accuracy"]])
            runs[name].append(
                {
                    "seed": seed,
                    "argv": argv,
                    "steps": result["steps"],
                    "train_seconds": result["train_seconds"],
                    "final_accuracy": result["val_accuracy"],
                    "evals": evals,
                }
            )

    # The target is read off the same curve the times are: the plain runs' last validation.
    # (Their separately printed final accuracy is another pass over the validation loader,
    # whose batches and masks change with its epoch: the first full run, 2026-12-02, took it
    # as the target and no plain run "reached" its own final accuracy on its curve.)
    target = min(r["evals"][-1][2] for r in runs["plain"])
    plain_time = {r["seed"]: time_to(target, r["evals"]) for r in runs["plain"]}
    peak = found.get("lr_finder", {}).get("suggestion", 0.0)
    table = Table(
        title=f"time to the plain recipe's final validation accuracy ({target:.2%}), "
        f"{args.seeds} seed(s)",
        caption=f"finders (run once, first, {found.get('seconds', 0.0):.0f} s): "
        f"LR range test peak ({args.lr_rule}) {peak:.3g}, "
        f"batch size {found['batch_size']} (lr {found['lr']:.3g}), "
        f"threads {found['threads'] or 'default'}, "
        f"workers {found['workers']}; training time only (validation excluded); "
        f"validation every {args.eval_every} steps at batch {args.batch_size}",
    )
    for col in ("variant", "steps", "reached", "time to target", "x plain", "final acc", "time"):
        table.add_column(col, justify="right")
    summary: dict[str, Any] = {}
    for name in variants:
        times = [time_to(target, r["evals"]) for r in runs[name]]
        ratios = [
            t / plain_time[r["seed"]]
            for t, r in zip(times, runs[name], strict=True)
            if t is not None and plain_time[r["seed"]]
        ]
        reached = [t for t in times if t is not None]
        summary[name] = {
            "times_to_target": times,
            "ratio_to_plain": statistics.mean(ratios) if len(ratios) == len(times) else None,
            "final_accuracy": statistics.mean(r["final_accuracy"] for r in runs[name]),
        }
        ratio = summary[name]["ratio_to_plain"]
        table.add_row(
            name,
            str(runs[name][0]["steps"]),
            f"{len(reached)}/{len(times)}",
            f"{statistics.mean(reached):.1f} s" if reached else "not reached",
            f"{ratio:.2f}x" if ratio is not None else "-",
            f"{summary[name]['final_accuracy']:.2%}",
            f"{statistics.mean(r['train_seconds'] for r in runs[name]):.1f} s",
        )
    meta.update(target_accuracy=target, runs=runs, summary=summary, quick=quick)
    if console is not None:
        console.print(table)
        if "all" in summary:
            ratio = summary["all"]["ratio_to_plain"]
            ok = ratio is not None and ratio <= TARGET_RATIO
            meta["acceptance_pass"] = ok
            console.print(
                f"all together: {'-' if ratio is None else f'{ratio:.2f}x'} the plain recipe's "
                f"time to target (target <= {TARGET_RATIO}x): {'PASS' if ok else 'FAIL'}"
                + (" (--quick: not a measurement)" if quick else "")
            )
    bench.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
