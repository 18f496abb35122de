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

__all__ = ["AUTO_CANDIDATES", "AutoChoice", "choose_quantization", "select_form"]

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
    names = ["fp32" if m == "none" else m for m in AUTO_CANDIDATES]
    chosen, reason = select_form(
        names,
        accuracy=[r.accuracy for r in rows],
        latency_ms=[r.latency_ms[max(batch_sizes)].median for r in rows],
        accuracy_budget=accuracy_budget,
        batch=max(batch_sizes),
    )
    method = AUTO_CANDIDATES[names.index(chosen)]
    return AutoChoice(made[method], method, reason, rows)


def select_form(
    names: Sequence[str],
    *,
    accuracy: Sequence[float],
    latency_ms: Sequence[float],
    accuracy_budget: float,
    batch: int,
) -> tuple[str, str]:
    """The rule ``auto`` applies, on measurements: the lowest latency among the forms whose
    accuracy is within ``accuracy_budget`` of the first (the reference). Returns the chosen
    name and a sentence saying why, with every other form's speed."""
    floor = accuracy[0] - accuracy_budget
    eligible = [i for i in range(len(names)) if accuracy[i] >= floor]
    best = min(eligible, key=lambda i: latency_ms[i])

    def speed(i: int) -> str:
        return f"{latency_ms[0] / latency_ms[i]:.2f}x"

    others = ", ".join(
        f"{names[i]} {speed(i)}{'' if accuracy[i] >= floor else ' (over budget)'}"
        for i in range(len(names))
        if i != best
    )
    reason = (
        f"{names[best]}: the fastest at batch {batch} on this machine ({speed(best)} fp32's "
        f"speed) with accuracy {accuracy[best]:.1%} against fp32's {accuracy[0]:.1%} "
        f"(budget {100 * accuracy_budget:g} point(s)); others: {others}"
    )
    return names[best], reason
