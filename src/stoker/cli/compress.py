"""``stoker compress RUN_OR_CHECKPOINT``: prune and/or quantize a trained MLM encoder, save it,
and print the measured size / latency / accuracy table against the fp32 and bf16 baselines.

The table is also written as JSON next to the saved model and, for a model from a run
directory, into ``<run>/compressed/`` too, and the run's HTML report is written again with a
Compression section (the table and accuracy against latency, see
:func:`stoker.report.run_view.compression`)."""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from torch import Tensor
from torch.utils.data import DataLoader

from stoker.cli._checks import check_count
from stoker.compress import (
    PRUNE_METHODS,
    QUANT_METHODS,
    Evaluation,
    PruneConfig,
    QuantConfig,
    TrainedModel,
    choose_quantization,
    compress,
    evaluate,
    evaluation_table,
    load_compressed,
    load_trained,
)
from stoker.data import load_token_documents, load_tokenizer, mlm_loader
from stoker.errors import StokerError
from stoker.records.listing import find_run
from stoker.report import write_report
from stoker.report.load import COMPRESSED

NAME = "compress"
HELP = "prune / quantize a trained MLM run and measure size, CPU latency and accuracy"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source", help="run directory, run id (or -1: latest), or a step-N checkpoint directory"
    )
    parser.add_argument("--prune", choices=PRUNE_METHODS, default="none")
    parser.add_argument(
        "--sparsity",
        type=float,
        default=0.5,
        help="magnitude: fraction of weights zeroed; structured: fraction of FFN neurons removed",
    )
    parser.add_argument(
        "--head-sparsity", type=float, default=0.0, help="structured: fraction of heads removed"
    )
    parser.add_argument(
        "--quantize",
        choices=(*QUANT_METHODS, "auto"),
        default="int8-static",
        help="auto: measure every form on this machine, keep the fastest within --accuracy-budget",
    )
    parser.add_argument(
        "--accuracy-budget",
        type=float,
        default=1.0,
        help="auto: accuracy points a form may lose against the unquantized model",
    )
    parser.add_argument("--finetune-steps", type=int, default=0, help="MLM steps after pruning")
    parser.add_argument("--finetune-lr", type=float, default=5e-4)
    parser.add_argument("--calibration-batches", type=int, default=8, help="int8-static")
    parser.add_argument("--out", type=Path, default=None, help="output .safetensors file")
    parser.add_argument("--eval-batches", type=int, default=50, help="validation batches")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per batch size")
    parser.add_argument("--no-baselines", action="store_true", help="skip fp32 / bf16 rows")
    parser.add_argument(
        "--no-compile", action="store_true", help="measure eager (int8 is slow uncompiled)"
    )
    parser.add_argument("--root", default=None, help="runs directory, for run ids")


def _resolve(source: str, root: str | None) -> Path:
    path = Path(source)
    if path.exists():
        return path
    return find_run(source, root)


def main(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    prune = PruneConfig(
        method=args.prune,
        sparsity=args.sparsity,
        head_sparsity=args.head_sparsity,
        finetune_steps=args.finetune_steps,
        finetune_lr=args.finetune_lr,
    )
    auto = args.quantize == "auto"
    quant = QuantConfig(
        method="none" if auto else args.quantize, calibration_batches=args.calibration_batches
    )
    out: Path | None = args.out
    if out is not None and (out.is_dir() or out.suffix != ".safetensors"):
        example = out / "model.safetensors" if out.is_dir() else out.with_suffix(".safetensors")
        raise StokerError(f"--out {out}: give a file path ending in .safetensors (e.g. {example})")
    if out is not None:  # before minutes of work, not after
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StokerError(
                f"cannot write {out}: {exc.strerror or exc}; choose another --out"
            ) from None
    if args.eval_batches < 1:
        raise StokerError(f"--eval-batches {args.eval_batches}: needs at least 1.")
    check_count("--repeats", args.repeats, least=1, what="timed call per batch size")
    trained = load_trained(_resolve(args.source, args.root))
    cfg = trained.model.config
    console.print(
        f"stoker compress: {trained.checkpoint} ({cfg.dim}x{cfg.layers} encoder, "
        f"{trained.model.num_parameters() / 1e6:.2f}M parameters)",
        soft_wrap=True,
    )
    tokenizer = load_tokenizer(progress=True)
    if tokenizer.get_vocab_size() != cfg.vocab_size:
        raise StokerError(
            f"the model has {cfg.vocab_size} token ids, the cached tokenizer "
            f"{tokenizer.get_vocab_size()}: it was trained with another tokenizer."
        )
    loader = functools.partial(
        mlm_loader, vocab_size=cfg.vocab_size, max_len=cfg.max_len, batch_size=32
    )
    train = loader(load_token_documents("train", tokenizer=tokenizer), seed=1)
    val = loader(load_token_documents("validation", tokenizer=tokenizer), shuffle=False, seed=1234)
    val_batches = [b for _, b in zip(range(args.eval_batches), val, strict=False)]

    if auto:
        return _auto(args, trained, prune, train, val_batches, console)
    progress = Progress(
        TextColumn("[bold]fine-tune"), BarColumn(), MofNCompleteColumn(), console=console
    )
    with progress:
        task = progress.add_task("fine-tune", total=prune.finetune_steps, visible=False)
        if prune.finetune_steps:
            progress.update(task, visible=True)
        result = compress(
            trained.model,
            prune,
            quant,
            train_loader=train,
            on_finetune_step=lambda step, _loss: progress.update(task, completed=step),
        )
    result.info["source"] = str(trained.checkpoint)
    base_dir = trained.run_dir or trained.checkpoint
    label = _label(prune, quant.method)
    out = args.out or base_dir / "compressed" / f"{label}.safetensors"
    path = result.save(out)
    console.print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")

    compile_ = not args.no_compile
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        forms = [] if args.no_baselines else [("fp32", "none"), ("bf16", "bf16")]
        for name, method in forms:
            baseline = compress(trained.model, PruneConfig(), QuantConfig(method=method))
            with console.status(f"measuring the {name} baseline"):
                served = load_compressed(
                    baseline.save(Path(tmp) / f"{name}.safetensors"), compile=compile_
                )
                rows.append(evaluate(served, val_batches, repeats=args.repeats, name=name))
        with console.status(f"measuring {label} (compiling on first calls)"):
            served = load_compressed(path, compile=compile_)
            rows.append(evaluate(served, val_batches, repeats=args.repeats))
    _table_and_json(rows, path, console, trained.run_dir)
    return 0


def _table_and_json(
    rows: list[Evaluation], path: Path, console: Console, run_dir: Path | None
) -> None:
    # piped output gets the table at full width rather than squeezed into 80 columns
    Console(width=None if sys.stdout.isatty() else 160).print(
        evaluation_table(rows, title="stoker compress")
    )
    text = json.dumps([r.to_json() for r in rows], indent=1) + "\n"
    report = path.with_suffix(".json")
    report.write_text(text)
    console.print(f"wrote {report}")
    if run_dir is None:
        return
    in_run = run_dir / COMPRESSED / report.name
    try:
        if in_run.resolve() != report.resolve():  # --out elsewhere: the run keeps a copy
            in_run.parent.mkdir(exist_ok=True)
            in_run.write_text(text)
        html = write_report(run_dir)
    except (OSError, StokerError) as exc:  # the measurements are written; the page is extra
        console.print(f"stoker: warning: the run's report was not updated: {exc}")
        return
    console.print(f"report: {html}")


def _auto(
    args: argparse.Namespace,
    trained: TrainedModel,
    prune: PruneConfig,
    train: DataLoader,
    val_batches: list[dict[str, Tensor]],
    console: Console,
) -> int:
    """--quantize auto: every form measured here; the fastest within the budget is saved."""
    with tempfile.TemporaryDirectory() as tmp, console.status("") as status:
        choice = choose_quantization(
            trained.model,
            prune,
            train_loader=train,
            val_batches=val_batches,
            workdir=Path(tmp),
            accuracy_budget=args.accuracy_budget / 100,
            repeats=args.repeats,
            compile=not args.no_compile,
            on_candidate=lambda m: status.update(
                f"auto: compressing and measuring {m} (compiling on first calls)"
            ),
        )
    choice.compressed.info["source"] = str(trained.checkpoint)
    choice.compressed.info["auto_reason"] = choice.reason
    base_dir = trained.run_dir or trained.checkpoint
    label = _label(prune, choice.method)
    path = choice.compressed.save(args.out or base_dir / "compressed" / f"{label}.safetensors")
    _table_and_json(choice.rows, path, console, trained.run_dir)
    console.print(f"auto chose {choice.reason}", soft_wrap=True, highlight=False)
    console.print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


def _label(prune: PruneConfig, method: str) -> str:
    return f"{prune.label}-{method}".replace(":", "").replace("%", "").replace("+", "-")
