"""Threads finder: step time over intra-op threads x DataLoader workers, on the user's step.

``torch.set_num_threads(1)`` copied from a forum can halve a CPU job's speed, and the best
number of loader workers depends on how heavy the collate is against the step. Each pair is
timed on the user's own step (data loading included) and the fastest measured pair is
recommended; for serving a model at batch 1, pass ``workers=(0,)`` and an inference step.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from stoker.errors import StokerError
from stoker.tune._common import Deadline, preserved, progress_bar, synchronize

__all__ = ["ThreadsResult", "ThreadsTrial", "find_threads"]


@dataclass(frozen=True, slots=True)
class ThreadsTrial:
    threads: int
    workers: int
    seconds_per_step: float | None
    status: str
    """``"ok"`` or ``"time"`` (skipped: it would not fit the time bound)."""


@dataclass(frozen=True, slots=True)
class ThreadsResult:
    trials: list[ThreadsTrial]
    threads: int
    """Recommended ``torch.set_num_threads`` value (the fastest measured pair's)."""
    workers: int
    """Recommended ``DataLoader(num_workers=...)`` (the fastest measured pair's)."""

    def table(self) -> list[tuple[str, str, str, str]]:
        """Rows ``(threads, workers, ms/step, status)`` for printing."""
        return [
            (
                str(t.threads),
                str(t.workers),
                "-" if t.seconds_per_step is None else f"{1e3 * t.seconds_per_step:,.1f}",
                t.status
                + (" best" if (t.threads, t.workers) == (self.threads, self.workers) else ""),
            )
            for t in self.trials
        ]


def _default_threads() -> list[int]:
    cores = os.cpu_count() or 1
    found = {1, cores}
    n = 2
    while n < cores:
        found.add(n)
        n *= 2
    return sorted(found)


def find_threads(
    make_steps: Callable[[int], Iterator[Any]],
    *,
    threads: Sequence[int] | None = None,
    workers: Sequence[int] = (0, 1, 2),
    steps: int = 5,
    warmup: int = 2,
    max_seconds: float = 120.0,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    progress: bool = True,
) -> ThreadsResult:
    """Time ``steps`` steps (after ``warmup``) for every ``(threads, workers)`` pair.

    ``make_steps(num_workers)`` returns an iterator whose every ``next()`` runs one step with
    a DataLoader of that many workers (fresh per pair, so worker start-up falls in the
    warm-up). ``threads`` defaults to 1, powers of two and the core count. The thread count in
    force before is restored, and ``model``/``optimizer`` if given.
    """
    pool = list(threads) if threads is not None else _default_threads()
    if not pool or min(pool) < 1 or not workers or min(workers) < 0:
        raise StokerError(
            f"find_threads needs threads >= 1 and workers >= 0; got threads={pool}, "
            f"workers={list(workers)}."
        )
    if steps < 1 or warmup < 0:
        raise StokerError(f"find_threads needs steps >= 1, warmup >= 0; got {steps}, {warmup}.")
    pairs = [(t, w) for t in pool for w in workers]
    deadline = Deadline(max_seconds)
    saved = torch.get_num_threads()
    trials: list[ThreadsTrial] = []
    slowest = 0.0  # seconds one pair took: the prediction for the next
    try:
        with preserved(model, optimizer), progress_bar("tune threads", enabled=progress) as bar:
            task = bar.add_task("threads", total=len(pairs), note="")
            for t, w in pairs:
                if trials and not deadline.allows(slowest):
                    trials.append(ThreadsTrial(t, w, None, "time"))
                    continue
                bar.update(task, note=f"{t} threads, {w} workers")
                torch.set_num_threads(t)
                began = time.perf_counter()
                iterator = make_steps(w)
                for _ in range(warmup):
                    next(iterator)
                synchronize()
                timed = time.perf_counter()
                for _ in range(steps):
                    next(iterator)
                synchronize()
                now = time.perf_counter()
                close = getattr(iterator, "close", None)
                if callable(close):
                    close()  # ends the loader's workers now
                slowest = max(slowest, now - began)
                trials.append(ThreadsTrial(t, w, (now - timed) / steps, "ok"))
                bar.advance(task)
    finally:
        torch.set_num_threads(saved)
    measured = [x for x in trials if x.seconds_per_step is not None]
    best = min(measured, key=lambda x: x.seconds_per_step or 0.0)
    return ThreadsResult(trials, best.threads, best.workers)
