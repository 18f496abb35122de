"""Learning-rate range test (Smith 2017, "Cyclical Learning Rates", section 3.3): train a few
steps with the learning rate rising exponentially from ``min_lr`` to ``max_lr``, watch the
smoothed loss, and suggest a peak for a one-cycle schedule.

Three rules read a peak off the curve (``rule=``); the result carries the minimum and the
steepest point whichever is chosen:

- ``"min"`` (the default): the minimum itself, Smith's upper bound of the range. On the
  built-in MLM the finder puts it at 5.0e-3 (on an EPYC Zen 3 and a Zen 5 alike); that peak
  (scaled to the batch size the batch-size finder picked), with sequence-length warm-up, took
  a 0.6x-token schedule furthest of the variants in ``benchmarks/time_to_accuracy.py``. It
  sits close to divergence (one exploratory run at 8e-3 trained much worse): check it on
  your model.
- ``"min/10"``: fastai's rule of thumb, the minimum divided by 10; at the minimum the loss is
  about to blow up, a tenth of it still descends. The cautious choice (5e-4 on the built-in
  MLM, a quarter of its plain LR).
- ``"steepest"``: where the smoothed loss falls fastest per unit of log LR, before its minimum.

Each is clamped into the scanned range.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stoker.errors import StokerError
from stoker.tune._common import Deadline, preserved, progress_bar

__all__ = ["LR_RULES", "LRRangeResult", "find_lr"]

LR_RULES = ("min", "min/10", "steepest")
"""How :func:`find_lr` reads a peak off the curve (module docstring)."""


@dataclass(frozen=True, slots=True)
class LRRangeResult:
    """What :func:`find_lr` measured."""

    lrs: list[float]
    """The learning rate of each step run (ascending)."""
    losses: list[float]
    """The smoothed (bias-corrected exponential moving average) loss after each step."""
    suggestion: float
    """Suggested one-cycle peak, by :attr:`rule`."""
    steepest: float
    """The LR where the smoothed loss fell fastest (per unit of log LR) before its minimum."""
    stopped: str
    """Why the scan ended: ``"max_lr"``, ``"diverged"`` or ``"time"``."""
    minimum: float
    """The LR at the smoothed loss's minimum."""
    rule: str
    """The rule :attr:`suggestion` follows: ``"min/10"``, ``"min"`` or ``"steepest"``."""

    def plot(self, path: str | Path) -> Path:
        """Write the loss-vs-LR curve as a PNG (needs matplotlib: ``pip install matplotlib``)."""
        try:
            import matplotlib

            matplotlib.use("Agg")  # no display needed
            import matplotlib.pyplot as plt
        except ImportError:
            raise StokerError(
                "plotting the LR range test needs matplotlib; pip install matplotlib"
            ) from None
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(self.lrs, self.losses)
        ax.set_xscale("log")
        ax.axvline(
            self.suggestion, color="tab:red", linestyle="--", label=f"suggested peak ({self.rule})"
        )
        ax.set_xlabel("learning rate")
        ax.set_ylabel("smoothed loss")
        ax.legend()
        fig.tight_layout()
        out = Path(path)
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out


def _forever(batches: Iterable[Any]) -> Iterator[Any]:
    """``batches`` again and again (re-iterated, not cached as ``itertools.cycle`` would)."""
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise StokerError("find_lr got no batches; pass a non-empty iterable of batches.")


def find_lr(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[Any], torch.Tensor],
    batches: Iterable[Any],
    *,
    min_lr: float = 1e-6,
    max_lr: float = 1.0,
    steps: int = 100,
    smoothing: float = 0.9,
    diverge: float = 4.0,
    max_seconds: float = 120.0,
    rule: str = "min",
    progress: bool = True,
) -> LRRangeResult:
    """Run the range test on ``model`` with ``optimizer``; restore both afterwards.

    ``loss_fn(batch)`` returns the scalar loss of one batch (the forward pass on ``model``);
    ``batches`` is cycled. Each step: ``zero_grad``, ``loss_fn(batch).backward()``, ``step``
    at ``lr_i = min_lr * (max_lr / min_lr) ** (i / (steps - 1))`` on every parameter group.
    Stops early once the smoothed loss exceeds ``diverge`` x its minimum or is not finite, or
    when ``max_seconds`` are up. ``rule`` picks the suggestion (module docstring). Reads the
    loss every step (a host sync: this is a finder, not a training loop).
    """
    if rule not in LR_RULES:
        raise StokerError(f"find_lr rule={rule!r}; choose one of {', '.join(LR_RULES)}.")
    if not 0 < min_lr < max_lr:
        raise StokerError(f"find_lr needs 0 < min_lr < max_lr; got {min_lr}, {max_lr}.")
    if steps < 5:
        raise StokerError(f"find_lr steps={steps} must be >= 5 to see a curve.")
    if not 0 <= smoothing < 1:
        raise StokerError(f"find_lr smoothing={smoothing} must be in [0, 1).")
    deadline = Deadline(max_seconds)
    ratio = max_lr / min_lr
    lrs: list[float] = []
    losses: list[float] = []
    avg, best, stopped = 0.0, math.inf, "max_lr"
    source = batches if isinstance(batches, Iterator) else _forever(batches)
    with preserved(model, optimizer), progress_bar("tune lr", enabled=progress) as bar:
        task = bar.add_task("lr", total=steps, note="")
        model.train()
        for i in range(steps):
            if not deadline.allows(0.0):
                stopped = "time"
                break
            lr = min_lr * ratio ** (i / (steps - 1))
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(next(source))
            loss.backward()
            optimizer.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                stopped = "diverged"
                break
            avg = smoothing * avg + (1 - smoothing) * value
            smoothed = avg / (1 - smoothing ** (i + 1))
            lrs.append(lr)
            losses.append(smoothed)
            best = min(best, smoothed)
            bar.update(task, advance=1, note=f"lr {lr:.2e} loss {smoothed:.3f}")
            if i >= 5 and smoothed > diverge * best:
                stopped = "diverged"
                break
    if len(lrs) < 3:
        raise StokerError(
            f"the LR range test ran only {len(lrs)} steps ({stopped}); raise max_seconds or "
            f"lower min_lr (the loss was not finite at lr {min_lr:.1e})."
        )
    lowest = int(np.argmin(losses))
    slope = np.gradient(np.asarray(losses), np.log(np.asarray(lrs)))
    steepest = lrs[int(np.argmin(slope[: lowest + 1]))]
    picked = {"min/10": lrs[lowest] / 10, "min": lrs[lowest], "steepest": steepest}[rule]
    suggestion = min(max(picked, lrs[0]), lrs[-1])
    return LRRangeResult(lrs, losses, suggestion, steepest, stopped, lrs[lowest], rule)
