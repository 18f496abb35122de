"""Batch-size finder: samples per second over candidate batch sizes, on the user's own step.

Tries the candidates in ascending order (powers of two by default), each for a few timed steps
(at least ``steps``, and at least ``min_seconds`` of them: a 25 ms step timed three times is
noise) after warm-up steps, and stops when throughput stops improving, when memory would run
out, or when the time bound would be passed. Out of memory is survived: on CUDA,
``torch.cuda.OutOfMemoryError`` (the cache is emptied and the size marked "oom"); on CPU the
process would be killed instead of raising, so a **memory budget** is enforced by prediction:
the peak resident memory each size added is measured (on Linux its own high-water mark, reset
through ``/proc/self/clear_refs`` before each trial; elsewhere the process's ``ru_maxrss``
growth), assumed to grow linearly with the batch size, and a size predicted to exceed the
budget is not run.

Then the sizes measured are **timed again, interleaved**: rounds of one step per size, in a
fresh random order each round, as long as ``refine_rounds`` and the time bound allow; a size's
throughput is its size over its median step across the scan and the rounds. Measured one
after the other, each size sees another stretch of a shared machine: on a 2-vCPU VM the same
size read 94 and 106 samples/s in two scans, enough to reorder sizes whose real difference is
a few percent. Interleaved, a slow stretch slows every size alike.

The recommendation is the fastest size measured; with ``margin`` (e.g. 0.05) it is the
*smallest* size within that share of the fastest's throughput instead: a smaller batch takes
more optimizer steps per sample, which usually helps accuracy per sample, and on a CPU
throughput is often flat over a range of sizes. The matching learning rate scales with the
batch: ``"sqrt"`` (``lr * sqrt(new / old)``, the rule for Adam-type optimizers,
Malladi et al. 2022) or ``"linear"`` (``lr * new / old``, for SGD, Goyal et al. 2017).
"""

from __future__ import annotations

import gc
import os
import random
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
from rich.progress import Progress

from stoker.errors import StokerError
from stoker.tune._common import Deadline, preserved, progress_bar, synchronize

__all__ = ["BatchSizeResult", "BatchSizeTrial", "find_batch_size", "scale_lr"]

_SCALINGS = ("sqrt", "linear")


@dataclass(frozen=True, slots=True)
class BatchSizeTrial:
    """One candidate: its throughput, or why it was not measured."""

    batch_size: int
    samples_per_second: float | None
    memory_bytes: int | None
    """Peak memory the size added over the start (CUDA: allocated; CPU: resident)."""
    status: str
    """``"ok"``, ``"oom"``, ``"memory budget"`` (predicted to exceed it) or ``"time"``."""


@dataclass(frozen=True, slots=True)
class BatchSizeResult:
    trials: list[BatchSizeTrial]
    best: int
    """The fastest measured size (most samples per second)."""
    recommended: int
    """The smallest measured size within ``margin`` of the best throughput."""
    lr: float | None
    """``base_lr`` scaled from ``base_batch_size`` to ``recommended`` (if both were given)."""
    stopped: str
    """Why no larger size was tried: ``"plateau"``, ``"oom"``, ``"memory budget"``,
    ``"time"`` or ``"candidates"`` (all tried)."""
    rounds: int = 0
    """Interleaved rounds run over the measured sizes after the scan."""

    def table(self) -> list[tuple[str, str, str, str]]:
        """Rows ``(batch size, samples/s, memory MiB, status)`` for printing."""
        rows = []
        for t in self.trials:
            mark = (" best" if t.batch_size == self.best else "") + (
                " recommended" if t.batch_size == self.recommended else ""
            )
            rows.append(
                (
                    str(t.batch_size),
                    "-" if t.samples_per_second is None else f"{t.samples_per_second:,.1f}",
                    "-" if t.memory_bytes is None else f"{t.memory_bytes / 2**20:,.0f}",
                    t.status + mark,
                )
            )
        return rows


def scale_lr(lr: float, old: int, new: int, rule: str = "sqrt") -> float:
    """``lr`` for batch size ``new`` when ``old`` had ``lr``: ``sqrt`` or ``linear`` scaling."""
    if rule not in _SCALINGS:
        raise StokerError(f"lr scaling {rule!r}; valid choices: {', '.join(_SCALINGS)}.")
    factor = new / old
    return lr * (factor**0.5 if rule == "sqrt" else factor)


def _peak_rss() -> int:
    """Peak resident memory of this process so far, in bytes (Linux: KiB, macOS: bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def _status_bytes(field: str) -> int | None:
    """``VmRSS`` / ``VmHWM`` of this process from ``/proc/self/status`` (Linux), in bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _start_peak_window() -> int | None:
    """Linux: restart the resident-memory high-water mark (``clear_refs`` 5) and return the
    resident memory now, so that a trial's peak is its own, whatever ran before it in this
    process; None elsewhere (then the process's peak RSS is used, which a higher earlier peak
    hides)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _status_bytes("VmRSS")


def _available_memory() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil is a dependency of the test extra
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def _oom_types() -> tuple[type[BaseException], ...]:
    found: list[type[BaseException]] = [MemoryError]
    for owner, name in ((torch, "OutOfMemoryError"), (torch.cuda, "OutOfMemoryError")):
        kind = getattr(owner, name, None)
        if isinstance(kind, type) and issubclass(kind, BaseException):
            found.append(kind)
    return tuple(found)


def find_batch_size(
    step_fn: Callable[[int], object],
    *,
    candidates: Sequence[int] | None = None,
    max_batch_size: int = 1024,
    steps: int = 3,
    warmup: int = 2,
    margin: float = 0.0,
    min_gain: float = 0.03,
    min_seconds: float = 1.0,
    refine_rounds: int = 5,
    memory_budget: int | None = None,
    max_seconds: float = 120.0,
    base_batch_size: int | None = None,
    base_lr: float | None = None,
    lr_scaling: Literal["sqrt", "linear"] = "sqrt",
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> BatchSizeResult:
    """Measure ``step_fn(batch_size)`` (one whole training step at that size) per candidate.

    Args:
        candidates: ascending sizes; default powers of two up to ``max_batch_size``.
        steps, warmup: timed and untimed steps per candidate.
        margin: the recommendation may be this much slower than the best (module docstring).
        min_gain: a size must beat the best so far by this fraction, else the search stops.
        min_seconds: each candidate's timed steps go on until they took this long (at least
            ``steps`` of them).
        refine_rounds: interleaved rounds over the measured sizes afterwards (fewer if the
            time bound comes first; 0 for none); throughput is the size over its median step.
        memory_budget: bytes the search may add (default: 80% of the memory available at the
            start; on CUDA the device's free memory).
        max_seconds: the whole search's bound; a candidate predicted not to fit is skipped.
        base_batch_size, base_lr: your current setting, to scale the LR (``lr_scaling``).
        model, optimizer: restored afterwards (the steps trained them).
        device: where the step runs (``"cuda"`` enables the CUDA memory accounting).
    """
    sizes = list(candidates) if candidates is not None else []
    if candidates is None:
        size = 1
        while size <= max_batch_size:
            sizes.append(size)
            size *= 2
    if not sizes or any(b < 1 for b in sizes) or sizes != sorted(set(sizes)):
        raise StokerError(f"batch-size candidates {sizes} must be ascending distinct ints >= 1.")
    if steps < 1 or warmup < 0 or not 0 <= margin < 1 or min_seconds < 0 or refine_rounds < 0:
        raise StokerError(
            f"find_batch_size needs steps >= 1, warmup >= 0, 0 <= margin < 1, min_seconds >= 0, "
            f"refine_rounds >= 0; got steps={steps}, warmup={warmup}, margin={margin}, "
            f"min_seconds={min_seconds}, refine_rounds={refine_rounds}."
        )
    if lr_scaling not in _SCALINGS:
        raise StokerError(f"lr_scaling={lr_scaling!r}; valid choices: {', '.join(_SCALINGS)}.")
    cuda = torch.device(device).type == "cuda" if device is not None else False
    deadline = Deadline(max_seconds)
    if memory_budget is None:
        memory_budget = (
            int(torch.cuda.mem_get_info()[0] * 0.9) if cuda else int(0.8 * _available_memory())
        )
    start_rss = _peak_rss()
    trials: list[BatchSizeTrial] = []
    stopped = "candidates"
    best_speed = 0.0
    last: tuple[int, float, int] | None = None  # (size, seconds per step, memory)
    step_times: dict[int, list[float]] = {}  # each measured size's timed steps
    oom = _oom_types()
    with preserved(model, optimizer), progress_bar("tune batch-size", enabled=progress) as bar:
        task = bar.add_task("bs", total=len(sizes), note="")
        for i, size in enumerate(sizes):
            if last is not None:
                grow = size / last[0]
                if last[2] * grow > memory_budget:
                    stopped = "memory budget"
                elif not deadline.allows(
                    last[1] * grow * warmup + max(min_seconds, last[1] * grow * steps)
                ):
                    stopped = "time"
            if stopped != "candidates":
                trials += [BatchSizeTrial(b, None, None, stopped) for b in sizes[i:]]
                break
            bar.update(task, note=f"batch size {size}")
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                cuda_start = torch.cuda.memory_allocated()
            window = _start_peak_window()
            try:
                for _ in range(warmup):
                    step_fn(size)
                synchronize()
                timed = time.perf_counter()
                times: list[float] = []
                last_end = timed
                while len(times) < steps or last_end - timed < min_seconds:
                    step_fn(size)
                    synchronize()
                    now = time.perf_counter()
                    times.append(now - last_end)
                    last_end = now
            except oom:
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
                trials.append(BatchSizeTrial(size, None, None, "oom"))
                trials += [BatchSizeTrial(b, None, None, "oom") for b in sizes[i + 1 :]]
                stopped = "oom"
                break
            step_times[size] = times
            step_seconds = statistics.median(times)
            speed = size / step_seconds
            if cuda:
                memory = torch.cuda.max_memory_allocated() - cuda_start
            else:
                high = _status_bytes("VmHWM") if window is not None else None
                if window is not None and high is not None:
                    memory = max(0, high - window)
                else:
                    memory = max(0, _peak_rss() - start_rss)
            trials.append(BatchSizeTrial(size, speed, memory, "ok"))
            last = (size, step_seconds, memory)
            bar.advance(task)
            if best_speed and speed < best_speed * (1 + min_gain):
                trials += [BatchSizeTrial(b, None, None, "not tried") for b in sizes[i + 1 :]]
                stopped = "plateau"
                break
            best_speed = max(best_speed, speed)
        rounds = _interleaved_rounds(step_fn, step_times, refine_rounds, deadline, bar)
        trials = [
            replace(
                t, samples_per_second=t.batch_size / statistics.median(step_times[t.batch_size])
            )
            if t.batch_size in step_times and t.status == "ok"
            else t
            for t in trials
        ]
    measured = [t for t in trials if t.samples_per_second is not None]
    if not measured:
        raise StokerError(
            f"no batch size could be measured (smallest, {sizes[0]}: {trials[0].status}); "
            f"try smaller candidates or a larger max_seconds."
        )
    fastest = max(measured, key=lambda t: t.samples_per_second or 0.0)
    top = fastest.samples_per_second or 0.0
    recommended = min(
        t.batch_size for t in measured if (t.samples_per_second or 0.0) >= (1 - margin) * top
    )
    lr = None
    if base_lr is not None and base_batch_size is not None:
        lr = scale_lr(base_lr, base_batch_size, recommended, lr_scaling)
    return BatchSizeResult(trials, fastest.batch_size, recommended, lr, stopped, rounds)


def _interleaved_rounds(
    step_fn: Callable[[int], object],
    step_times: dict[int, list[float]],
    rounds: int,
    deadline: Deadline,
    bar: Progress,
) -> int:
    """Time one more step of every size in ``step_times`` per round, in a random order (seeded:
    a search is repeatable), appending to its times; returns the rounds run."""
    sizes = list(step_times)
    if len(sizes) < 2 or rounds == 0:
        return 0
    order = random.Random(0)
    done = 0
    task = bar.add_task("rounds", total=rounds, note="timing the sizes again, interleaved")
    while done < rounds:
        per_round = sum(statistics.median(step_times[b]) for b in sizes)
        if not deadline.allows(per_round):
            break
        order.shuffle(sizes)
        for size in sizes:
            began = time.perf_counter()
            step_fn(size)
            synchronize()
            step_times[size].append(time.perf_counter() - began)
        done += 1
        bar.advance(task)
    return done
