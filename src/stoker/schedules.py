"""Learning-rate schedules as plain ``torch.optim.lr_scheduler.LambdaLR`` objects."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from stoker.errors import StokerError

__all__ = ["warmup_cosine"]


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    *,
    warmup_steps: int,
    total_steps: int | Callable[[], int],
    min_ratio: float = 0.1,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the optimizer's learning rate, then cosine decay to ``min_ratio`` of it.

    For ``warmup_steps=2, total_steps=6, min_ratio=0``: factors 0.5, 1.0, then 1.0, 0.85, 0.5,
    0.15 on the way down (half a cosine over the 4 remaining steps), 0 from step 6 on.

    ``total_steps`` may be a function, read at every step: for a length decided during warm-up
    (a time budget measured on the first steps, say); keep what it reads in the checkpoint.
    """
    initial_total = total_steps() if callable(total_steps) else total_steps
    if initial_total < 1 or not 0 <= warmup_steps <= initial_total:
        raise StokerError(
            f"warmup_cosine needs 0 <= warmup_steps <= total_steps and total_steps >= 1; got "
            f"warmup_steps={warmup_steps}, total_steps={initial_total}"
        )
    if not 0.0 <= min_ratio <= 1.0:
        raise StokerError(f"warmup_cosine min_ratio={min_ratio} must be in [0, 1]")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        total = total_steps() if callable(total_steps) else total_steps
        decay_steps = max(1, total - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
