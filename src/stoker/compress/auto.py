"""``--quantize auto``: the fastest form on *this* machine that keeps accuracy within a budget.

Which int8 or float form serves fastest depends on the CPU: on an AMX Xeon static int8 measured
2.6x fp32 at batch 32 and bf16 1.9x, while an AVX2-only CPU emulates bf16 and has no VNNI. So no
form is chosen from a table: each candidate is built from the same (pruned, fine-tuned) weights,
saved, loaded back through the serving path and measured here, and the fastest at the largest
batch whose validation accuracy is within ``accuracy_budget`` of the unquantized model wins.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor
from torch.utils.data import DataLoader

from stoker.compress.api import Compressed, compress
from stoker.compress.config import PruneConfig, QuantConfig
from stoker.compress.evaluate import Evaluation, evaluate
from stoker.compress.serve import load_compressed
from stoker.errors import StokerError
from stoker.models import Encoder

__all__ = ["AUTO_CANDIDATES", "AutoChoice", "choose_quantization"]

AUTO_CANDIDATES = ("none", "int8-static", "int8-dynamic", "int8-weight", "bf16")
"""Tried in this order; ``none`` (the unquantized model) is the accuracy reference."""


@dataclass(frozen=True, slots=True)
class AutoChoice:
    """The chosen form, why, and every candidate's measurement (the reference first)."""

    compressed: Compressed
    method: str
    reason: str
    rows: list[Evaluation]


def choose_quantization(
    model: Encoder,
    prune: PruneConfig,
    *,
    train_loader: DataLoader,
    val_batches: Sequence[dict[str, Tensor]],
    workdir: Path,
    accuracy_budget: float = 0.01,
    batch_sizes: Sequence[int] = (1, 32),
    repeats: int = 30,
    compile: bool = True,
    on_candidate: Callable[[str], None] | None = None,
) -> AutoChoice:
    """Prune ``model`` once, quantize it every way in :data:`AUTO_CANDIDATES`, measure each
    as served, and return the fastest within ``accuracy_budget`` (a fraction: 0.01 = 1 point)."""
    if not 0 <= accuracy_budget < 1:
        raise StokerError(
            f"accuracy budget {accuracy_budget!r} must be a fraction in [0, 1) (0.01 = 1 point)"
        )
    pruned = compress(model, prune, QuantConfig(), train_loader=train_loader)
    made: dict[str, Compressed] = {}
    rows: list[Evaluation] = []
    for method in AUTO_CANDIDATES:
        if on_candidate is not None:
            on_candidate(method)
        candidate = compress(
            pruned.model, PruneConfig(), QuantConfig(method=method), train_loader=train_loader
        )
        # The file says how the model was pruned, not that this pass pruned nothing.
        candidate.prune = prune
        candidate.info = {**candidate.info, "params_before": pruned.info["params_before"]}
        served = load_compressed(
            candidate.save(workdir / f"auto-{method}.safetensors"), compile=compile
        )
        name = "fp32" if method == "none" else method
        rows.append(
            evaluate(served, val_batches, batch_sizes=batch_sizes, repeats=repeats, name=name)
        )
        made[method] = candidate
    top = max(batch_sizes)
    reference = rows[0]
    floor = reference.accuracy - accuracy_budget
    eligible = [(m, r) for m, r in zip(AUTO_CANDIDATES, rows, strict=True) if r.accuracy >= floor]
    method, best = min(eligible, key=lambda mr: mr[1].latency_ms[top].median)

    def speed(r: Evaluation) -> str:
        return f"{reference.latency_ms[top].median / r.latency_ms[top].median:.2f}x"

    others = ", ".join(
        f"{r.name} {speed(r)}{'' if r.accuracy >= floor else ' (over budget)'}"
        for r in rows
        if r is not best
    )
    reason = (
        f"{best.name}: the fastest at batch {top} on this machine ({speed(best)} fp32's "
        f"speed) with accuracy {best.accuracy:.1%} against fp32's {reference.accuracy:.1%} "
        f"(budget {100 * accuracy_budget:g} point(s)); others: {others}"
    )
    return AutoChoice(made[method], method, reason, rows)
