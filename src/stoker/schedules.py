"""Learning-rate schedules as plain ``torch.optim.lr_scheduler`` objects.

Each is stepped once per optimizer step (a scheduler passed to ``Stoker.prepare`` is, also
under gradient accumulation) and resumes exactly from its ``state_dict``. Where the length of
training is decided late (a time budget measured on the first steps), ``total_steps`` may be a
function read at every step; keep what it reads in the checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from stoker.errors import StokerError

__all__ = ["one_cycle", "warmup_cosine", "warmup_stable_decay"]


def _total(total_steps: int | Callable[[], int]) -> int:
    return total_steps() if callable(total_steps) else total_steps


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
    initial_total = _total(total_steps)
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
        decay_steps = max(1, _total(total_steps) - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def warmup_stable_decay(
    optimizer: torch.optim.Optimizer,
    *,
    warmup_steps: int,
    total_steps: int | Callable[[], int],
    decay_fraction: float = 0.2,
    min_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, a long stable phase at the optimizer's learning rate, then a linear decay
    to ``min_ratio`` of it over the last ``decay_fraction`` of training ("WSD"; the stable
    phase's checkpoints can be decayed later to branch off a shorter run).

    For ``warmup_steps=2, total_steps=10, decay_fraction=0.4, min_ratio=0``: factors 0.5, 1.0,
    then 1.0 through step 5, 1.0, 0.75, 0.5, 0.25 over steps 6-9, 0 from step 10 on.
    """
    total = _total(total_steps)
    if total < 1 or not 0 <= warmup_steps <= total:
        raise StokerError(
            f"warmup_stable_decay needs 0 <= warmup_steps <= total_steps and total_steps >= 1; "
            f"got warmup_steps={warmup_steps}, total_steps={total}"
        )
    if not 0.0 < decay_fraction <= 1.0 or not 0.0 <= min_ratio <= 1.0:
        raise StokerError(
            f"warmup_stable_decay decay_fraction={decay_fraction} must be in (0, 1] and "
            f"min_ratio={min_ratio} in [0, 1]"
        )

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        total = _total(total_steps)
        decay_steps = max(1, round(decay_fraction * total))
        decay_start = max(warmup_steps, total - decay_steps)
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, total - decay_start))
        return min_ratio + (1.0 - min_ratio) * (1.0 - progress)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def one_cycle(
    optimizer: torch.optim.Optimizer,
    *,
    total_steps: int,
    warmup_fraction: float = 0.25,
    start_ratio: float = 1 / 25,
    end_ratio: float = 1e-4,
    cycle_momentum: bool = False,
) -> torch.optim.lr_scheduler.OneCycleLR:
    """One cycle (Smith & Topin, 2018): from ``start_ratio`` of the optimizer's learning rate
    up to it over the first ``warmup_fraction`` of ``total_steps``, then a cosine anneal down
    to ``end_ratio`` of it. ``cycle_momentum`` moves momentum (SGD) or beta1 (Adam) the other
    way, between 0.85 and 0.95.

    torch's ``OneCycleLR``, with its peak taken from the optimizer's learning rate (per group)
    rather than passed twice. For ``total_steps=5, warmup_fraction=0.4, start_ratio=0.5,
    end_ratio=0.1``: factors 0.5, 1.0, then 0.775, 0.325, 0.1 at the last step.
    """
    if total_steps < 2 or not 0.0 < warmup_fraction < 1.0:
        raise StokerError(
            f"one_cycle needs total_steps >= 2 and 0 < warmup_fraction < 1; got "
            f"total_steps={total_steps}, warmup_fraction={warmup_fraction}"
        )
    if not 0.0 < end_ratio <= start_ratio <= 1.0:
        raise StokerError(
            f"one_cycle needs 0 < end_ratio <= start_ratio <= 1; got start_ratio={start_ratio}, "
            f"end_ratio={end_ratio}"
        )
    peaks = [group["lr"] for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=peaks,
        total_steps=total_steps,
        pct_start=warmup_fraction,
        anneal_strategy="cos",
        cycle_momentum=cycle_momentum,
        div_factor=1 / start_ratio,
        final_div_factor=start_ratio / end_ratio,
    )
