"""How much of the computed tokens is padding, and how evenly the ranks are loaded.

Two ways to get a :class:`RaggedSummary` (what the logs and the doctor's ``padding-waste`` and
``rank-imbalance`` rules read):

- measured in the loop by :class:`TokenCounter`: ``counter.update(batch)`` every step costs one
  device reduction (and a copy into a device buffer) and never makes the host wait;
  ``counter.summary()`` resolves the counts (one sync, plus an all-gather when
  ``torch.distributed`` is initialised) at logging time;
- predicted from a sampler's plan, without running anything: :func:`summarize_plan`.

Definitions, for per-rank per-step counts ``real[r, s]`` (non-padding tokens) and
``computed[r, s]`` (every position the model computes, padding included):

- padding fraction = ``1 - sum(real) / sum(computed)``;
- imbalance of step ``s`` = ``max_r real[r, s] / min_r real[r, s]`` (1.0 is perfect); the
  summary gives its mean and worst over the steps;
- wait fraction = ``1 - sum_s mean_r real[r, s] / sum_s max_r real[r, s]``: the share of rank
  time spent waiting at the all-reduce for the busiest rank, if time were proportional to
  tokens (in data-parallel training every step lasts as long as its slowest rank).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from stoker.data.packing import PackingConfig
from stoker.errors import StokerError

__all__ = ["RaggedSummary", "TokenCounter", "summarize_counts", "summarize_plan"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RaggedSummary:
    """Padding and rank balance over a number of steps (definitions in the module docstring)."""

    steps: int
    """Steps counted (each rank contributes one batch per step)."""
    ranks: int
    """Data-parallel ranks counted."""
    real_tokens: int
    """Non-padding tokens, all ranks and steps."""
    computed_tokens: int
    """Token positions the model computed on, padding included, all ranks and steps."""
    padding_fraction: float
    """``1 - real_tokens / computed_tokens``; 0.0 when nothing was computed."""
    real_tokens_per_step: float
    """Mean non-padding tokens per rank per step."""
    real_tokens_per_rank: tuple[float, ...]
    """Mean non-padding tokens per step, for each rank."""
    imbalance: float
    """Mean over steps of max/min real tokens across ranks (1.0 = balanced or one rank)."""
    imbalance_worst: float
    """The largest per-step max/min ratio."""
    wait_fraction: float
    """Share of rank time spent waiting for the busiest rank (tokens as the time proxy)."""

    def as_dict(self) -> dict[str, float | int | list[float]]:
        """Plain values for a metrics log (``real_tokens_per_rank`` as a list)."""
        out: dict[str, float | int | list[float]] = asdict(self)
        out["real_tokens_per_rank"] = list(self.real_tokens_per_rank)
        return out


def summarize_counts(
    real: np.ndarray | Sequence[Sequence[int]], computed: np.ndarray | Sequence[Sequence[int]]
) -> RaggedSummary:
    """Summarise per-rank per-step counts ``real[r, s]`` and ``computed[r, s]`` ([R, S])."""
    real_a = np.asarray(real, dtype=np.int64)
    comp_a = np.asarray(computed, dtype=np.int64)
    if real_a.ndim != 2 or real_a.shape != comp_a.shape:
        raise StokerError(
            f"summarize_counts wants real and computed counts of the same shape [ranks, "
            f"steps]; got {real_a.shape} and {comp_a.shape}."
        )
    if (real_a > comp_a).any() or (real_a < 0).any():
        raise StokerError(
            "summarize_counts got real token counts above the computed ones or below 0; pass "
            "(non-padding tokens, all computed positions) per rank and step."
        )
    ranks, steps = real_a.shape
    total_real, total_comp = int(real_a.sum()), int(comp_a.sum())
    if steps == 0:
        ratio = np.ones(1)
        waiting = 0.0
    else:
        most, least = real_a.max(axis=0), real_a.min(axis=0)
        ratio = np.maximum(most, 1) / np.maximum(least, 1)  # zero tokens count as one
        waiting = 1.0 - float(real_a.mean(axis=0).sum()) / max(int(most.sum()), 1)
    return RaggedSummary(
        steps=steps,
        ranks=ranks,
        real_tokens=total_real,
        computed_tokens=total_comp,
        padding_fraction=1.0 - total_real / total_comp if total_comp else 0.0,
        real_tokens_per_step=total_real / (ranks * steps) if steps else 0.0,
        real_tokens_per_rank=tuple(float(x) for x in real_a.mean(axis=1))
        if steps
        else (0.0,) * ranks,
        imbalance=float(ratio.mean()),
        imbalance_worst=float(ratio.max()),
        wait_fraction=waiting,
    )


def summarize_plan(
    plan: Sequence[Sequence[Sequence[int]]],
    lengths: Sequence[int] | np.ndarray,
    *,
    max_len: int | None = None,
    packing: PackingConfig | None = None,
) -> RaggedSummary:
    """Predict the summary of a sampler's ``plan[step][rank]`` (e.g. ``sampler.plan()``).

    Without ``packing``, each batch is padded to its longest sample, truncated at ``max_len``
    (what ``pad_batch`` does). With ``packing``, each batch computes ``rows * max_len``
    positions of that config and keeps every token (``long_documents="split"``) or the first
    ``max_len`` of each document (``"truncate"``).
    """
    lens = np.asarray(lengths, dtype=np.int64)
    if packing is not None:
        if packing.rows is None:
            raise StokerError("summarize_plan needs PackingConfig(rows=...) for packed plans.")
        cap = packing.max_len if packing.long_documents == "truncate" else None
        per_batch = packing.rows * packing.max_len
    else:
        cap = max_len
    clipped = lens if cap is None else np.minimum(lens, cap)
    ranks = len(plan[0]) if len(plan) else 1
    real = np.zeros((ranks, len(plan)), dtype=np.int64)
    computed = np.zeros_like(real)
    for s, step in enumerate(plan):
        for r, batch in enumerate(step):
            tokens = clipped[list(batch)]
            real[r, s] = int(tokens.sum())
            if packing is not None:
                computed[r, s] = per_batch
            else:
                computed[r, s] = len(tokens) * (int(tokens.max()) if len(tokens) else 0)
    return summarize_counts(real, computed)


class TokenCounter:
    """Per-step real and computed token counts, kept on the device until :meth:`summary`.

    ``update`` takes a batch with a ``valid`` [B, T] bool tensor (True = real token; the
    layout collators ``pad_batch`` and ``PackingCollator`` both produce it) or the tensor
    itself: the real count is a device reduction written into slot ``step`` of one
    preallocated device buffer (grown by doubling, a device-side copy), the computed count
    (``B * T``) comes from the shape, so nothing waits for the device and the memory held is
    one int64 per step, not one tensor per step. Call ``summary`` at logging time, on every
    rank at once when distributed (it all-gathers, bounded by ``$STOKER_COLLECTIVE_TIMEOUT``).
    """

    _FIRST_CAPACITY = 1024  # steps; 8 KB

    def __init__(self) -> None:
        self._real: Tensor | None = None  # [capacity] int64 on the batches' device
        self._computed: list[int] = []
        self._group: Any = None  # summary()'s gloo group, made by its first distributed call

    @property
    def steps(self) -> int:
        """Steps counted since construction or the last :meth:`reset`."""
        return len(self._computed)

    def update(self, batch: Mapping[str, Tensor] | Tensor) -> None:
        """Count one step's batch (no host-device sync)."""
        valid = batch if isinstance(batch, Tensor) else batch.get("valid")
        if not isinstance(valid, Tensor) or valid.dtype != torch.bool:
            raise StokerError(
                "TokenCounter.update wants a batch with a 'valid' bool tensor [B, T] (True = "
                "real token) or that tensor; use pad_batch or PackingCollator as the layout."
            )
        step = len(self._computed)
        real = self._real
        if real is None or step == len(real):
            real = self._real = self._grown(valid.device)
        real[step] = valid.sum()  # a device-to-device copy into the buffer
        self._computed.append(valid.numel())

    def _grown(self, device: torch.device) -> Tensor:
        steps = len(self._computed)
        grown = torch.zeros(max(self._FIRST_CAPACITY, 2 * steps), dtype=torch.int64, device=device)
        if self._real is not None:
            grown[:steps] = self._real[:steps]
        return grown

    def reset(self) -> None:
        """Forget every count (e.g. after logging a summary)."""
        self._computed.clear()

    def summary(self) -> RaggedSummary:
        """Resolve the counts (syncs) and summarise them across ranks if distributed."""
        n = len(self._computed)
        real = self._real[:n] if self._real is not None else torch.zeros(0, dtype=torch.int64)
        computed = torch.tensor(self._computed, dtype=torch.int64, device=real.device)
        counts = torch.stack([real.to(torch.int64), computed])  # [2, S]
        host = counts.cpu()
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            stacked = self._gather(host).numpy()  # [R, 2, S]
            return summarize_counts(stacked[:, 0], stacked[:, 1])
        return summarize_counts(host[:1].numpy(), host[1:].numpy())

    def _gather(self, counts: Tensor) -> Tensor:
        """Every rank's host ``counts`` [2, S], stacked [R, 2, S], on a gloo group of stoker's
        own: a rank that never calls ``summary`` fails the others in one line after
        ``$STOKER_COLLECTIVE_TIMEOUT`` seconds (default 300) instead of torch's 30 minutes."""
        # Imported here: stoker.runtime imports stoker.data (a cycle at the top of the module).
        from stoker.runtime.distributed import CollectiveTimeout, collective_timeout, control_group

        what = "TokenCounter.summary()"
        dist = torch.distributed
        if self._group is None:
            self._group = control_group(what)
        world = dist.get_world_size()
        try:
            steps = torch.tensor([counts.shape[1]])
            all_steps = [torch.empty_like(steps) for _ in range(world)]
            dist.all_gather(all_steps, steps, group=self._group)
            seen = [int(s) for s in all_steps]
            if len(set(seen)) != 1:
                raise StokerError(
                    f"ranks counted different numbers of steps {seen}; every rank must call "
                    f"TokenCounter.update once per step (use the stoker samplers: equal steps)."
                )
            gathered = [torch.empty_like(counts) for _ in range(world)]
            dist.all_gather(gathered, counts, group=self._group)
        except RuntimeError as exc:  # gloo's timeout (DistBackendError is a RuntimeError)
            raise CollectiveTimeout.from_error(what, exc, collective_timeout()) from exc
        return torch.stack(gathered)
