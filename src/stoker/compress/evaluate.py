"""``evaluate``: size, CPU latency, throughput and MLM quality of a served compressed model."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from rich.table import Table
from torch import Tensor

from stoker.bench import Stats, summarize
from stoker.compress.serve import CompressedModel
from stoker.data.loaders import model_inputs
from stoker.data.mlm import mlm_accuracy, mlm_loss

__all__ = ["Evaluation", "evaluate", "evaluation_table"]


@dataclass(frozen=True, slots=True)
class Evaluation:
    """One compressed form, measured; latencies in ms, one :class:`Stats` per batch size."""

    name: str
    params: int
    nonzero_params: int
    file_bytes: int
    linear_weight_bytes: int
    """Bytes of the block linears' weights in the file (the part pruning / int8 act on)."""
    latency_ms: dict[int, Stats]
    tokens_per_second: float
    """Input tokens per second at the largest measured batch (from its median latency)."""
    accuracy: float
    """Validation masked-token accuracy."""
    perplexity: float
    threads: int
    compiled: bool
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["latency_ms"] = {str(b): asdict(s) for b, s in self.latency_ms.items()}
        return out


def _rows(batch: dict[str, Tensor], rows: int) -> dict[str, Tensor]:
    """``rows`` rows from a batch (repeated when it has fewer)."""
    inputs = model_inputs(batch)
    have = inputs["input_ids"].size(0)
    index = torch.arange(rows) % have
    return {k: v[index] for k, v in inputs.items()}


@torch.no_grad()
def _quality(model: CompressedModel, batches: Sequence[dict[str, Tensor]]) -> tuple[float, float]:
    correct = counted = 0
    loss_sum = 0.0
    for batch in batches:
        logits = model(**model_inputs(batch))
        loss, n = mlm_loss(logits, batch["labels"])
        hits, total = mlm_accuracy(logits, batch["labels"])
        correct, counted = correct + int(hits), counted + int(total)
        loss_sum += float(loss) * int(n)
    if not counted:
        return float("nan"), float("nan")
    return correct / counted, math.exp(loss_sum / counted)


def evaluate(
    model: CompressedModel,
    val_batches: Sequence[dict[str, Tensor]],
    *,
    batch_sizes: Sequence[int] = (1, 32),
    warmup: int = 3,
    repeats: int = 30,
    name: str | None = None,
) -> Evaluation:
    """Measure ``model`` as served: quality over ``val_batches``, then per batch size
    ``warmup`` untimed calls (compilation happens there) and ``repeats`` timed calls, each
    one synchronous forward of rows taken from the first validation batch."""
    accuracy, perplexity = _quality(model, val_batches)
    latency = {}
    for b in batch_sizes:
        inputs = _rows(val_batches[0], b)
        for _ in range(warmup):
            model(**inputs)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(**inputs)
            times.append(1e3 * (time.perf_counter() - start))
        latency[b] = summarize(times)
    top = max(batch_sizes)
    tokens = top * val_batches[0]["input_ids"].size(1)
    return Evaluation(
        name=name or model.name,
        params=model.params,
        nonzero_params=model.nonzero_params,
        file_bytes=model.file_bytes,
        linear_weight_bytes=model.linear_weight_bytes,
        latency_ms=latency,
        tokens_per_second=tokens / (latency[top].median / 1e3),
        accuracy=accuracy,
        perplexity=perplexity,
        threads=torch.get_num_threads(),
        compiled=model.compiled,
    )


def evaluation_table(rows: Sequence[Evaluation], *, title: str = "compressed models") -> Table:
    """Rich table; ratios are against the first row (the fp32 baseline)."""
    base = rows[0]
    sizes = sorted({b for r in rows for b in r.latency_ms})
    table = Table(title=f"{title} ({base.threads} threads, latency p50 / p99 ms)")
    columns = ["form", "params (non-zero)", "file MB", "linear MB", "acc", "ppl"]
    columns += [f"batch {b}" for b in sizes] + [f"x fp32 @{sizes[-1]}", "tokens/s"]
    for col in columns:
        table.add_column(col, justify="left" if col == "form" else "right")
    for r in rows:
        lat = [
            f"{s.median:.1f} / {s.p99:.1f}" if (s := r.latency_ms.get(b)) else "-" for b in sizes
        ]
        speed = base.latency_ms[sizes[-1]].median / r.latency_ms[sizes[-1]].median
        table.add_row(
            r.name,
            f"{r.params / 1e6:.2f}M ({r.nonzero_params / 1e6:.2f}M)",
            f"{r.file_bytes / 1e6:.2f}",
            f"{r.linear_weight_bytes / 1e6:.2f}",
            f"{r.accuracy:.1%}",
            f"{r.perplexity:.1f}",
            *lat,
            f"{speed:.2f}",
            f"{r.tokens_per_second:,.0f}",
        )
    return table
