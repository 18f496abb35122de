"""The live meters of a run: throughput, step time, data wait, achieved FLOP/s, MFU, memory.

:class:`StepMeters` is a :class:`~stoker.runtime.step.StepListener` that a
:class:`~stoker.Stoker` attaches on the main rank (``Stoker(meters=False)`` for none). What it
needs per step, each step's end time and token count, the training step appends to a
:class:`~stoker.runtime.step.StepLog` (a clock read and a list append; no call into the meters).
The meters are called every ``every_steps`` steps (and at least ``min_seconds``), and then hand
the window's raw numbers to the metrics writer's thread, which computes the window's line for
``metrics.jsonl`` there (quantiles, rates, the token count read from the device); at the end of
the run they write a summary into ``record.json`` (``summary.meters``). ``benchmarks/report.py``
times whole steps with the meters on against off.

What each number is:

- ``step_s_p50`` / ``step_s_p99``: wall-clock seconds between consecutive step ends (the whole
  iteration: data, forward, backward, optimizer, the loop's own work). No device sync: on a
  GPU a step end is when the host queued the step, and over a window that is the device's pace.
- ``tokens_per_s``: the tokens given to ``stoker.backward(loss, tokens=n)`` (the tokens the
  loss averages over: for a masked LM, the masked ones) or to :meth:`StepMeters.count_tokens`
  (which replaces them: e.g. every input token), per second; of all ranks when ``tokens=``
  is given under DDP (it is all-reduced for the gradient anyway), of this rank otherwise.
- ``samples_per_s``: batches fetched from prepared loaders times their batch size (this rank).
- ``data_wait_share``: the share of the window the loop spent in a prepared loader's fetch.
- ``flops_per_s`` / ``mfu``: the FLOPs of one step of this rank over the step time, and that
  over this device's peak for the dtype the run computes in (:func:`stoker.meters.peak_flops`:
  measured on CPU, a dense data-sheet value on known GPUs). The FLOPs of a step are counted
  once, with ``FlopCounterMode``, over what runs between the end of the first step this
  process takes and the second step's optimizer step (its data, forward and backward; an
  evaluation run in that stretch would count too), or given as
  ``MetersConfig(flops_per_step=...)``. A compiled model is not counted (its fused kernels
  bypass the counter): give ``flops_per_step`` to get MFU under ``compile=True``. Timing
  starts at the end of the counted step, whose counting slows it. A window faster than the
  cached peak (a probe taken while other work shared the cores reads low) probes again, once.
- ``peak_memory_mb``: the CUDA allocator's peak on a GPU, the process's peak RSS on a CPU.

The first window line comes ``every_steps`` steps (and ``min_seconds``) after timing starts; a
run shorter than that writes no line, only the summary.
"""

from __future__ import annotations

import array
import collections
import logging
import resource
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils import flop_counter

from stoker.errors import StokerError
from stoker.meters import flops as _flops  # noqa: F401 (registers the CPU attention formulas)
from stoker.meters.peak import PeakFlops, peak_flops
from stoker.runtime.prepared import DataClock
from stoker.runtime.step import StepListener, StepLog, TrainingStep

__all__ = ["MetersConfig", "StepMeters", "peak_memory"]

log = logging.getLogger(__name__)


@dataclass(kw_only=True, slots=True)
class MetersConfig:
    """How often the meters write a line, and what a step's FLOPs are."""

    every_steps: int = 25
    """Steps per ``metrics.jsonl`` line at least (each line covers its window)."""
    min_seconds: float = 0.5
    """Seconds per line at least: with steps of a few hundred µs, 25-step windows would write
    hundreds of lines a second, and their statistics would cost the training thread's GIL a
    visible share of each step."""
    flops_per_step: float | None = None
    """FLOPs of one optimizer step of this rank; None: counted on the second step."""

    def __post_init__(self) -> None:
        if not isinstance(self.every_steps, int) or self.every_steps < 1:
            raise StokerError(f"MetersConfig.every_steps={self.every_steps!r}: use an integer >= 1")
        if not self.min_seconds >= 0:
            raise StokerError(f"MetersConfig.min_seconds={self.min_seconds!r}: use seconds >= 0")
        if self.flops_per_step is not None and not self.flops_per_step > 0:
            raise StokerError(
                f"MetersConfig.flops_per_step={self.flops_per_step!r}: give a positive number "
                "of FLOPs or None to count them"
            )


def peak_memory(device: torch.device) -> tuple[float, str]:
    """Peak memory in bytes so far and what it is: the CUDA allocator's peak on a GPU, the
    process's peak resident set on a CPU (``getrusage``: KiB on Linux, bytes on macOS)."""
    if device.type == "cuda" and torch.cuda.is_available():
        return float(torch.cuda.max_memory_allocated(device)), "cuda max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(rss if sys.platform == "darwin" else rss * 1024), "process peak RSS"


def _quantiles(seconds: Sequence[float]) -> tuple[float, float]:
    """p50 and p99 of ``seconds``, interpolated linearly between order statistics (numpy's
    default); in plain Python for a window (a few µs for 25 values, numpy's ~50 µs)."""
    ordered = sorted(seconds)
    last = len(ordered) - 1

    def at(q: float) -> float:
        position = q * last
        lo = int(position)
        hi = min(lo + 1, last)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (position - lo)

    return at(0.5), at(0.99)


_MAX_PENDING = 64  # windows kept for read() / summary() when no writer computes them first


class _Window:
    """One window's raw numbers, as the training thread hands them over; ``line`` once
    computed."""

    __slots__ = ("ends", "line", "samples", "start", "tokens", "wait")

    def __init__(
        self, start: float, ends: list[float], wait: float, samples: int, tokens: list[Any]
    ) -> None:
        self.start = start
        self.ends = ends
        self.wait = wait
        self.samples = samples
        self.tokens = tokens
        self.line: dict[str, Any] | None = None


class StepMeters(StepListener):
    """Meters one run's steps (see the module docstring for what each number is).

    Args:
        config: cadence and FLOPs.
        steps: the training step (for the token count of the step that just ended).
        clock: what the prepared loaders count (fetch time, samples).
        device: where the run computes (for the peak and memory).
        dtype: what its matrix products compute in: ``"fp32"``, ``"bf16"``, ``"fp16"``.
        count: whether the FLOPs may be counted on a step (False under ``torch.compile``).
        write: where a window's line goes: ``write(compute, step)`` queues a line whose
            metrics ``compute()`` returns on the metrics writer's thread (``Run.log_later``);
            None: no file (:meth:`read` and :meth:`summary` still work).
        record: where the run's summary goes when it ends (``record.json``), or None.
    """

    def __init__(
        self,
        config: MetersConfig,
        *,
        steps: TrainingStep,
        clock: DataClock,
        device: torch.device,
        dtype: str,
        count: bool,
        write: Callable[[Callable[[], dict[str, Any]], int], None] | None,
        record: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.config = config
        self.device = device
        self.dtype = dtype
        self.flops_per_step: float | None = config.flops_per_step
        self.peak: PeakFlops | None = None
        self.latest: dict[str, Any] = {}
        """The last window's line (values may be device tensors: see :meth:`read`)."""
        self._steps = steps
        self._clock = clock
        self._write = write
        self._record = record
        self._count = count and config.flops_per_step is None
        self._counter: flop_counter.FlopCounterMode | None = None
        self._counting = False  # the FLOPs of the current step are being counted
        self._started = False  # timing started (after the first step, or the counted one)
        self._user_tokens = False
        # The window: step ends and token counts, logged by the step from the start of timing
        # (the data clock's totals are read when the window is taken); count_tokens()' own.
        self._every = config.every_steps
        self._log = StepLog()
        self._window_due = 0.0  # the window may close from this time on (min_seconds)
        self._tokens: list[torch.Tensor] = []
        self._origin = (0.0, 0.0, 0)  # time, wait, samples at the start of the window
        # Windows handed over, computed in order by whichever thread comes first: the metrics
        # writer (its line), read(), summary(); the run's totals, for the summary.
        self._pending: collections.deque[_Window] = collections.deque()
        self._lock = threading.Lock()
        self._durations = array.array("d")  # every timed step of the run
        self._token_total: torch.Tensor | None = None  # on the device, one add per window
        self._wait_total = 0.0
        self._samples_total = 0
        self._closed = False
        self._refreshed = False  # the peak was probed again (a window beat the cached one)
        self._failed = False  # a window failed to be measured (warned once)

    # -- the hot path ---------------------------------------------------------------------
    def on_step_end(self, step: int) -> int | None:
        if not self._started:
            self._start(time.perf_counter())
            return None
        ends = self._log.ends
        n = len(ends)
        if n < self._every:
            return step + self._every - n
        now = ends[-1]  # this step's end, as the step logged it
        if now < self._window_due:  # fast steps: the ones the rest of min_seconds should take
            pace = n / max(now - self._origin[0], 1e-9)
            return step + max(1, int((self._window_due - now) * pace))
        try:
            self._emit(step)
        except Exception as exc:  # a meter must never stop the training it measures
            self._log.take()
            self._tokens.clear()
            if not self._failed:
                self._failed = True
                log.warning("meters: a window could not be measured: %s", exc)
        return step + self._every

    def count_tokens(self, tokens: torch.Tensor | int) -> None:
        """Count ``tokens`` (a device tensor or an int) for this micro-batch's throughput,
        instead of ``backward``'s ``tokens=`` (e.g. every input token of a masked LM, where
        the loss averages over the masked ones). No sync: the reference is kept and summed
        once per window."""
        if not self._user_tokens:
            self._user_tokens = True
            self._tokens.clear()
        if not isinstance(tokens, torch.Tensor):
            tokens = torch.tensor(tokens, device=self.device)
        elif tokens.numel() != 1:  # (numel is metadata: no sync)
            raise StokerError(
                f"count_tokens() takes one count (an int or a one-element tensor), got a "
                f"tensor of shape {tuple(tokens.shape)}; pass its .sum()"
            )
        if self._started:
            self._tokens.append(tokens.detach().reshape(()))

    # -- once ----------------------------------------------------------------------------
    def _start(self, now: float) -> None:
        """The first step end: the peak (measured once per machine and dtype, cached), then
        either the FLOP counter over the next step or the start of timing."""
        if self._counting:  # the end of the counted step
            self._counting = False
            self._stop_counting()  # (if the loop has no prepared optimizer to stop it)
            now = time.perf_counter()
        else:
            if self._count or self.flops_per_step is not None:
                self._resolve_peak()
            if self._count:
                self._counting = True
                self._counter = flop_counter.FlopCounterMode(display=False)
                self._counter.__enter__()
                self._steps.before_optimizer = self._stop_counting
                return
        self._started = True
        self._tokens.clear()
        self._log.take()
        self._steps.step_log = self._log
        clock = self._clock
        self._origin = (now, clock.wait, clock.samples)
        self._window_due = now + self.config.min_seconds

    def _stop_counting(self) -> None:
        """The counted step's gradients are complete: its FLOPs are the forward's and the
        backward's (an optimizer's elementwise update is not model FLOPs)."""
        counter, self._counter = self._counter, None
        self._steps.before_optimizer = None
        if counter is not None:
            counter.__exit__(None, None, None)
            self.flops_per_step = float(counter.get_total_flops()) or None

    def _resolve_peak(self) -> None:
        try:
            self.peak = peak_flops(self.device, self.dtype)
        except StokerError as exc:
            log.info("meters: no peak FLOP/s for %s %s: %s", self.device, self.dtype, exc)

    # -- every window: the hand-over (training thread) --------------------------------------
    def _emit(self, step: int) -> None:
        """Hand the window's raw numbers over: a list copy and a queued closure here; its
        statistics are computed on the metrics writer's thread (:meth:`_process`)."""
        window = self._take()
        self._pending.append(window)
        if self._write is not None:
            self._write(lambda: self._line_of(window), step)
        if len(self._pending) >= _MAX_PENDING:  # no writer (record=False) and nobody reading
            self._drain()

    def _take(self) -> _Window:
        """The steps since the last window as a window; the next one starts at their end."""
        t0, w0, s0 = self._origin
        ends, tokens = self._log.take()
        wait, samples = self._clock.wait, self._clock.samples
        if self._user_tokens:
            tokens, self._tokens = self._tokens, []
        window = _Window(t0, ends, wait - w0, samples - s0, tokens)
        self._origin = (ends[-1], wait, samples)
        elapsed = ends[-1] - t0
        if elapsed > 0 and self._beats_peak(len(ends) / elapsed):
            clock = self._clock  # the probe's seconds are not the next window's
            self._origin = (time.perf_counter(), clock.wait, clock.samples)
        self._window_due = self._origin[0] + self.config.min_seconds
        return window

    def _beats_peak(self, steps_per_s: float) -> bool:
        """A window faster than the peak means the cached probe read low (taken while other
        work shared the cores): measure again, once per run, and keep the better (see
        :func:`~stoker.meters.peak_flops`); True if it did (a second or so, on this thread)."""
        peak, flops = self.peak, self.flops_per_step
        if self._refreshed or peak is None or flops is None or flops * steps_per_s <= peak.flops:
            return False
        self._refreshed = True
        log.info("meters: %.3g FLOP/s beat the peak %s", flops * steps_per_s, peak.describe())
        self.peak = peak_flops(self.device, self.dtype, refresh=True)
        return True

    # -- every window: the statistics (any thread, in order) ---------------------------------
    def _line_of(self, window: _Window) -> dict[str, Any]:
        with self._lock:
            while window.line is None and self._pending:
                self._process(self._pending.popleft())
        return window.line or {}

    def _drain(self) -> None:
        with self._lock:
            while self._pending:
                self._process(self._pending.popleft())

    def _process(self, w: _Window) -> None:
        """The window's line, and the run's totals (under ``_lock``). No host sync: a token
        count on the device stays there (the metrics writer reads it)."""
        durations = [b - a for a, b in zip([w.start, *w.ends[:-1]], w.ends, strict=True)]
        elapsed = w.ends[-1] - w.start
        p50, p99 = _quantiles(durations)
        line: dict[str, Any] = {"step_s_p50": p50, "step_s_p99": p99}
        tokens = torch.stack(w.tokens).to(torch.float32).sum() if w.tokens else None
        if elapsed > 0:
            if tokens is not None:
                line["tokens_per_s"] = tokens / elapsed
            if w.samples:
                line["samples_per_s"] = w.samples / elapsed
            line["data_wait_share"] = w.wait / elapsed
            line.update(self._utilization(len(durations) / elapsed))
        line["peak_memory_mb"] = peak_memory(self.device)[0] / 2**20
        w.line = self.latest = line
        self._durations.extend(durations)
        self._wait_total += w.wait
        self._samples_total += w.samples
        if tokens is not None:
            total = self._token_total
            self._token_total = tokens if total is None else total + tokens

    def _utilization(self, steps_per_s: float) -> dict[str, float]:
        if self.flops_per_step is None:
            return {}
        achieved = self.flops_per_step * steps_per_s
        out = {"flops_per_s": achieved}
        if self.peak is not None:
            out["mfu"] = achieved / self.peak.flops
        return out

    # -- reading --------------------------------------------------------------------------
    def read(self) -> dict[str, float]:
        """The last window's numbers as floats (waits for the device if a token count is
        still on it: call it at your logging cadence, not every step)."""
        self._drain()
        return {
            k: float(v.item()) if isinstance(v, torch.Tensor) else float(v)
            for k, v in self.latest.items()
        }

    def summary(self) -> dict[str, Any]:
        """The whole run's numbers (reads the token count from the device: at the end)."""
        if self._log.ends:  # the steps since the last line count in the summary too
            self._pending.append(self._take())
        self._drain()
        durations = np.frombuffer(self._durations, dtype=np.float64)
        out: dict[str, Any] = {"timed_steps": len(durations)}
        if self.flops_per_step is not None:
            out["flops_per_step"] = self.flops_per_step
            out["flops_counted"] = self.config.flops_per_step is None
        if self.peak is not None:
            out["peak_flops"] = self.peak.flops
            out["peak"] = self.peak.describe()
        out["dtype"] = self.dtype
        memory, kind = peak_memory(self.device)
        out["peak_memory_mb"] = memory / 2**20
        out["memory"] = kind
        if not len(durations):
            return out
        elapsed = float(durations.sum())  # the timed steps' seconds (not a re-probe's)
        p50, p99 = (float(q) for q in np.quantile(durations, [0.5, 0.99]))
        out.update(step_s_p50=p50, step_s_p99=p99, seconds=elapsed)
        if elapsed > 0:
            if self._token_total is not None:
                tokens = float(self._token_total.item())
                out["tokens"] = tokens
                out["tokens_per_s"] = tokens / elapsed
            if self._samples_total:
                out["samples_per_s"] = self._samples_total / elapsed
            out["data_wait_share"] = self._wait_total / elapsed
            out.update(self._utilization(len(durations) / elapsed))
        return out

    def close(self, failed: BaseException | None) -> None:
        """Stop a FLOP count still running (a run that ended within its first two steps);
        hand the summary to ``record`` (a failed run's too: how fast it went until then)."""
        if self._closed:
            return
        self._closed = True
        if self._steps.step_log is self._log:
            self._steps.step_log = None
        self._stop_counting()
        if self._record is None:
            return
        try:
            summary = self.summary()
        except Exception as exc:  # the meters must never turn a finished run into a failed one
            log.warning("meters: no summary: %s", exc)
            return
        self._record(summary)
