"""Train large, then compress (Li et al., "Train Large, Then Compress", ICML 2020), measured here.

Three encoder sizes train on the stdlib corpus for the same wall-clock budget each (validation
accuracy sampled along the way, evaluation time excluded from the budget), then each is
compressed to several forms, and every form is saved, loaded through the serving path and
measured (:func:`stoker.compress.evaluate`). The report states whether the paper's two
findings hold here: (1) at equal training time the larger model is better; (2) a compressed
large model beats a small model of equal or larger size.
"""

from __future__ import annotations

import functools
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from stoker.bench import environment
from stoker.compress import (
    Evaluation,
    PruneConfig,
    QuantConfig,
    compress,
    evaluate,
    evaluation_table,
    load_compressed,
)
from stoker.data import load_token_documents, load_tokenizer, mlm_loader, model_inputs
from stoker.data.mlm import mlm_accuracy, mlm_loss
from stoker.errors import StokerError
from stoker.models import Encoder, EncoderConfig
from stoker.runtime import Stoker

__all__ = ["FORMS", "SIZES", "ExperimentConfig", "run_experiment"]

# name -> (EncoderConfig fields, peak learning rate); larger models take a lower rate.
SIZES: dict[str, tuple[dict[str, int], float]] = {
    "tiny": ({"dim": 128, "layers": 4, "heads": 4, "ffn_dim": 512}, 2e-3),
    "mini": ({"dim": 192, "layers": 5, "heads": 4, "ffn_dim": 768}, 1.5e-3),
    "small": ({"dim": 256, "layers": 6, "heads": 4, "ffn_dim": 1024}, 1e-3),
}
# name -> (prune, quantize): the compression levels every size goes through.
FORMS: dict[str, tuple[PruneConfig, QuantConfig]] = {
    "fp32": (PruneConfig(), QuantConfig()),
    "bf16": (PruneConfig(), QuantConfig(method="bf16")),
    "int8": (PruneConfig(), QuantConfig(method="int8-static")),
    "ffn-50% + int8": (
        PruneConfig(method="structured", sparsity=0.5, finetune_steps=100),
        QuantConfig(method="int8-static"),
    ),
}
MAX_LEN, BATCH = 128, 32


@dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    out: Path = Path("docs/experiments/train-large-then-compress")
    sizes: tuple[str, ...] = tuple(SIZES)
    budget_seconds: float = 300.0
    """Training wall-clock per size (evaluations excluded)."""
    curve_points: int = 8
    """Validation samples along each training run."""
    curve_batches: int = 10
    eval_batches: int = 50
    finetune_steps: int = 100
    repeats: int = 20
    compile: bool = True
    quick: bool = False

    @staticmethod
    def quick_config(out: Path) -> ExperimentConfig:
        """Seconds instead of half an hour: checks the pipeline, measures nothing worth citing."""
        return ExperimentConfig(
            out=out,
            budget_seconds=3.0,
            curve_points=2,
            curve_batches=1,
            eval_batches=2,
            finetune_steps=2,
            repeats=2,
            compile=False,
            quick=True,
        )

    def __post_init__(self) -> None:
        unknown = [s for s in self.sizes if s not in SIZES]
        if unknown or not self.sizes:
            raise StokerError(f"unknown sizes {unknown}; choose among {', '.join(SIZES)}.")
        if not 0 < self.budget_seconds < math.inf:  # NaN fails this too
            raise StokerError(
                f"budget_seconds={self.budget_seconds}; use a positive number of seconds"
            )
        if self.curve_points < 1:
            raise StokerError(f"curve_points={self.curve_points}; use 1 or more")


@dataclass
class SizeResult:
    name: str
    config: dict[str, Any]
    steps: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    curve: list[dict[str, float]] = field(default_factory=list)
    forms: dict[str, Evaluation] = field(default_factory=dict)


class _Clock:
    """Training time only: paused while the curve's validation runs."""

    def __init__(self) -> None:
        self.elapsed = 0.0
        self._since: float | None = None

    def start(self) -> None:
        self._since = time.perf_counter()

    def pause(self) -> None:
        if self._since is not None:
            self.elapsed += time.perf_counter() - self._since
            self._since = None

    def now(self) -> float:
        running = time.perf_counter() - self._since if self._since is not None else 0.0
        return self.elapsed + running


def _lr_factor(fraction: float) -> float:
    """Warm-up over the first 3% of the budget, then cosine down to 10%: by time, not steps."""
    if fraction < 0.03:
        return max(fraction / 0.03, 0.01)
    progress = min((fraction - 0.03) / 0.97, 1.0)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def _accuracy(model: torch.nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> float:
    model.eval()
    correct = counted = 0
    for batch in batches:
        hits, total = mlm_accuracy(model(**model_inputs(batch)), batch["labels"])
        correct, counted = correct + int(hits), counted + int(total)
    model.train()
    return correct / max(counted, 1)


def _train(
    name: str,
    vocab: int,
    train_docs: Any,
    curve_batches: Sequence[dict[str, torch.Tensor]],
    cfg: ExperimentConfig,
    console: Console,
) -> tuple[Encoder, SizeResult]:
    fields, lr = SIZES[name]
    model_cfg = EncoderConfig(vocab_size=vocab, max_len=MAX_LEN, **fields)
    result = SizeResult(name, asdict(model_cfg))
    stoker = Stoker(seed=0, record=False, doctor=False)
    model = Encoder(model_cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    clock = _Clock()
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda _: _lr_factor(clock.now() / cfg.budget_seconds)
    )
    loader = mlm_loader(train_docs, vocab_size=vocab, max_len=MAX_LEN, batch_size=BATCH, seed=0)
    net, opt, batches, sched = stoker.prepare(model, optimizer, loader, scheduler=scheduler)
    marks = [cfg.budget_seconds * (i + 1) / cfg.curve_points for i in range(cfg.curve_points)]
    tokens = torch.zeros((), dtype=torch.long)
    progress = Progress(
        TextColumn(f"[bold]train {name}"),
        BarColumn(),
        TextColumn("{task.fields[acc]}"),
        TimeRemainingColumn(),
        console=console,
    )
    with progress:
        task = progress.add_task(name, total=cfg.budget_seconds, acc="")
        clock.start()
        while marks:
            for batch in batches:
                with stoker.accumulate(net):
                    loss, n = mlm_loss(net(**model_inputs(batch)), batch["labels"])
                    stoker.backward(loss, tokens=n)
                    stoker.clip_grad_norm_(1.0)
                    opt.step()
                    sched.step()
                    opt.zero_grad()
                tokens += batch["valid"].sum()
                now = clock.now()
                progress.update(task, completed=min(now, cfg.budget_seconds))
                if now < marks[0]:
                    continue
                clock.pause()
                marks.pop(0)
                acc = _accuracy(net, curve_batches)
                result.curve.append(
                    {"seconds": now, "steps": stoker.step, "tokens": int(tokens), "accuracy": acc}
                )
                progress.update(task, acc=f"val acc {acc:.1%}")
                if not marks:
                    break
                clock.start()
    result.steps, result.tokens, result.train_seconds = stoker.step, int(tokens), clock.elapsed
    stoker.close()
    return model.eval(), result  # prepare() wrapped this module and left it untouched


def run_experiment(cfg: ExperimentConfig, console: Console | None = None) -> Path:
    """Train, compress, measure, plot and write the report; returns the report's path."""
    console = console or Console(stderr=True)
    started = time.perf_counter()
    tokenizer = load_tokenizer(progress=True)
    vocab = tokenizer.get_vocab_size()
    train_docs = load_token_documents("train", tokenizer=tokenizer)
    val_docs = load_token_documents("validation", tokenizer=tokenizer)
    loader = functools.partial(mlm_loader, vocab_size=vocab, max_len=MAX_LEN, batch_size=BATCH)
    val_loader = loader(val_docs, shuffle=False, seed=1234)
    val_batches = [b for _, b in zip(range(cfg.eval_batches), val_loader, strict=False)]
    curve_batches = val_batches[: cfg.curve_batches]
    train_loader = loader(train_docs, seed=1)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in cfg.sizes:
            model, result = _train(name, vocab, train_docs, curve_batches, cfg, console)
            for form, (prune, quant) in FORMS.items():
                if prune.finetune_steps:
                    prune = PruneConfig(
                        method=prune.method,
                        sparsity=prune.sparsity,
                        finetune_steps=cfg.finetune_steps,
                    )
                with console.status(f"{name}: compressing to {form} and measuring it"):
                    made = compress(model, prune, quant, train_loader=train_loader)
                    path = made.save(Path(tmp) / f"{name}-{len(result.forms)}.safetensors")
                    served = load_compressed(path, compile=cfg.compile)
                    result.forms[form] = evaluate(
                        served, val_batches, repeats=cfg.repeats, name=f"{name} {form}"
                    )
            console.print(evaluation_table(list(result.forms.values()), title=name))
            results.append(result)
    from stoker.experiments.report import write_report

    return write_report(cfg, results, environment(), time.perf_counter() - started)
