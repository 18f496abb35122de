"""What every finder shares: put the model and optimizer back, a time bound, a progress bar."""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from stoker.errors import StokerError


@contextlib.contextmanager
def preserved(
    model: torch.nn.Module | None, optimizer: torch.optim.Optimizer | None
) -> Iterator[None]:
    """Run the block, then restore ``model``'s weights, buffers, gradients and train/eval mode,
    ``optimizer``'s state (moments, step counts, learning rates) and torch's CPU RNG: a finder
    trains on the real model, and the user's run must start as if it never had."""
    rng = torch.get_rng_state()
    weights = copy.deepcopy(model.state_dict()) if model is not None else None
    grads = (
        [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]
        if model is not None
        else None
    )
    training = model.training if model is not None else None
    opt_state = copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None
    try:
        yield
    finally:
        if model is not None and weights is not None and grads is not None:
            model.load_state_dict(weights)
            for p, g in zip(model.parameters(), grads, strict=True):
                p.grad = g
            model.train(bool(training))
        if optimizer is not None and opt_state is not None:
            optimizer.load_state_dict(opt_state)
        torch.set_rng_state(rng)


class Deadline:
    """``max_seconds`` from construction; :meth:`allows` predicts whether work still fits."""

    def __init__(self, max_seconds: float) -> None:
        if not max_seconds > 0:
            raise StokerError(f"max_seconds={max_seconds} must be > 0.")
        self.max_seconds = float(max_seconds)
        self.start = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def allows(self, seconds: float) -> bool:
        """Whether ``seconds`` more work ends within the bound."""
        return self.elapsed + seconds <= self.max_seconds


def synchronize() -> None:
    """Wait for queued CUDA work so a wall-clock time covers it (a no-op on CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def progress_bar(what: str, *, enabled: bool = True) -> Progress:
    """The finders' progress bar (on stderr, gone once done)."""
    return Progress(
        TextColumn(f"[bold]{what}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        transient=True,
    )
