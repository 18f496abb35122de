"""``Bench``: interleaved warm-up and timed rounds, the table, the JSON; its config and CLI."""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from stoker.bench.environment import environment
from stoker.bench.results import CandidateResult, Comparison
from stoker.bench.stats import summarize
from stoker.errors import StokerError

DEFAULT_OUT_DIR = Path("bench-results")
# (warmup rounds, timed rounds) for a normal run and for --quick (a smoke test, not a claim).
_DEFAULT_ROUNDS = (3, 15)
_QUICK_ROUNDS = (1, 3)
CLOCKS = ("wall", "thread")


# ----------------------------------------------------------------------------------- config


@dataclass(frozen=True, kw_only=True, slots=True)
class BenchConfig:
    """How many rounds to run and where the JSON goes."""

    warmup: int = _DEFAULT_ROUNDS[0]
    """Untimed rounds before the timed ones (each runs every candidate once, interleaved)."""
    repeats: int = _DEFAULT_ROUNDS[1]
    """Timed rounds; each gives one sample per candidate."""
    out_dir: Path | None = DEFAULT_OUT_DIR
    """Directory for the JSON file; ``None`` writes nothing."""
    quick: bool = False
    """Smoke-test run: scripts shrink their sizes too; recorded so nobody quotes it."""
    clock: str = "wall"
    """``"wall"``: :func:`time.perf_counter`, the number users feel. ``"thread"``: CPU time of
    the calling thread (:func:`time.thread_time`) with torch limited to 1 intra-op thread: far
    less disturbed by other processes on a busy machine, but only meaningful for CPU work done
    on this thread (not for GPUs, not for DataLoader workers). Report which one you quote."""

    def __post_init__(self) -> None:
        if self.clock not in CLOCKS:
            raise StokerError(f"clock={self.clock!r} is not known; choose one of {CLOCKS}")
        if self.warmup < 0:
            raise StokerError(f"warmup={self.warmup} is negative; pass 0 or more warm-up rounds")
        if self.repeats < 1:
            raise StokerError(f"repeats={self.repeats} must be at least 1 timed round")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BenchConfig:
        """Build from a namespace parsed by :func:`bench_parser`."""
        # Named by their flags, before any work (BenchConfig would name its fields).
        for flag, value, least in (("--repeats", args.repeats, 1), ("--warmup", args.warmup, 0)):
            if value is not None and value < least:
                raise StokerError(f"{flag} {value}: needs at least {least} round(s)")
        rounds = getattr(args, "bench_rounds", _DEFAULT_ROUNDS)
        warmup, repeats = _QUICK_ROUNDS if args.quick else rounds
        return cls(
            warmup=warmup if args.warmup is None else args.warmup,
            repeats=repeats if args.repeats is None else args.repeats,
            out_dir=None if args.no_save else Path(args.out),
            quick=bool(args.quick),
            clock=getattr(args, "clock", "wall"),
        )


def bench_parser(
    description: str, *, warmup: int = _DEFAULT_ROUNDS[0], repeats: int = _DEFAULT_ROUNDS[1]
) -> argparse.ArgumentParser:
    """The argument parser every benchmark script starts from; add script options to it.

    ``warmup``/``repeats`` are this script's defaults for a full run (``--quick`` always uses
    the quick rounds unless ``--warmup``/``--repeats`` are given).
    """
    parser = argparse.ArgumentParser(description=description)
    parser.set_defaults(bench_rounds=(warmup, repeats))
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: {_QUICK_ROUNDS[1]} rounds and smaller sizes (numbers not for claims)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help=f"timed rounds (default {repeats}, {_QUICK_ROUNDS[1]} with --quick)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help=f"untimed rounds (default {warmup}, {_QUICK_ROUNDS[0]} with --quick)",
    )
    parser.add_argument(
        "--out", default=str(DEFAULT_OUT_DIR), help="directory for the JSON results (%(default)s)"
    )
    parser.add_argument("--no-save", action="store_true", help="print the tables, write no JSON")
    parser.add_argument(
        "--clock",
        choices=CLOCKS,
        default="wall",
        help="wall: elapsed time (default); thread: this thread's CPU time with 1 torch thread, "
        "robust on a busy machine",
    )
    return parser


@dataclass(frozen=True, slots=True)
class Candidate:
    """One way of doing the work: ``fn()`` is one call (e.g. one training step)."""

    name: str
    fn: Callable[[], object]
    work: float | None = None
    """Work done by one call (tokens, samples, flop); gives a throughput column."""
    returns_work: bool = False
    """``fn()`` returns its own work count (a number or 0-d tensor), read after the clock stops."""

    def __post_init__(self) -> None:
        if not self.name:
            raise StokerError("a Candidate needs a non-empty name; it labels the table row")
        if self.work is not None and self.returns_work:
            raise StokerError(
                f"candidate {self.name!r} has both work={self.work} and returns_work=True; "
                "pass a fixed work per call or return it from fn, not both"
            )
        if self.work is not None and not self.work > 0:
            raise StokerError(f"candidate {self.name!r} has work={self.work}; it must be > 0")


# ------------------------------------------------------------------------------------ bench


def _autocast_cpu_enabled() -> bool:
    try:
        return bool(torch.is_autocast_enabled("cpu"))
    except TypeError:  # torch < 2.4 had no device_type argument
        return bool(torch.is_autocast_cpu_enabled())


def _process_state() -> dict[str, object]:
    # State one candidate could leave behind and silently speed up or slow down the next one.
    return {
        "torch intra-op threads": torch.get_num_threads(),
        "CPU autocast enabled": _autocast_cpu_enabled(),
        "grad mode enabled": torch.is_grad_enabled(),
        # "medium"/"high" let oneDNN/cuBLAS run fp32 matmuls in bf16/tf32.
        "float32 matmul precision": torch.get_float32_matmul_precision(),
    }


class _RoundOrder:
    """The order of each round's candidates: a fresh random permutation (seeded, so a run's
    order is reproducible), never starting with the candidate that ended the previous round.

    Why not A B C, C B A, ...: at each turn the end candidates run twice in a row, and a
    candidate that follows itself finds its code and data in the caches. The first candidate
    is the baseline: on ``overhead.py``'s 0.45 ms MLP step an identical copy of it measured
    1.002-1.006x the baseline in four runs of that order, 0.995-1.000x in four of this one. A
    random order gives every candidate every position and every predecessor alike, so drift
    and cache effects cancel in expectation, and no sample ever follows one of its own.
    """

    __slots__ = ("_last", "_n", "_random")

    def __init__(self, n: int, seed: int = 0) -> None:
        self._n = n
        self._random = random.Random(seed)
        self._last: int | None = None

    def next(self) -> list[int]:
        order = list(range(self._n))
        self._random.shuffle(order)
        if self._n > 1 and order[0] == self._last:  # swap it with a random other position
            j = self._random.randrange(1, self._n)
            order[0], order[j] = order[j], order[0]
        self._last = order[-1]
        return order


@dataclass(slots=True)
class _Samples:
    seconds: list[float] = field(default_factory=list)
    warmup: list[float] = field(default_factory=list)
    work: list[float] = field(default_factory=list)


class Bench:
    """One benchmark run: several comparisons, one environment, one JSON file.

    Tables go to ``console`` (default: a new stdout console); ``quiet=True`` prints nothing.
    ``config.clock == "thread"`` sets torch's intra-op threads to 1 here (recorded in the
    environment), so that all the work is done on the thread whose CPU time is measured.
    ``clock`` overrides the time source, for tests (a fake clock makes timings exact).
    """

    def __init__(
        self,
        name: str,
        config: BenchConfig | None = None,
        *,
        meta: dict[str, Any] | None = None,
        console: Console | None = None,
        quiet: bool = False,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if not name or "/" in name:
            raise StokerError(f"benchmark name {name!r} must be non-empty and contain no '/'")
        self.name = name
        self.config = config if config is not None else BenchConfig()
        # The caller's dict itself, not a copy: a script that fills it in after constructing
        # the bench (its results, as it computes them) gets them saved.
        self.meta: dict[str, Any] = meta if meta is not None else {}
        """Script inputs and extra measurements (sizes, compile time); saved in the JSON."""
        self.comparisons: list[Comparison] = []
        if console is None and not quiet:
            # Piped to a file or a log: don't squeeze the table into 80 columns.
            console = Console() if sys.stdout.isatty() else Console(width=160)
        self.console: Console | None = None if quiet else console
        if clock is None:
            clock = time.perf_counter
            if self.config.clock == "thread":
                clock = time.thread_time
                torch.set_num_threads(1)
        self._clock = clock
        self.environment = environment()
        """Captured when the run starts (after ``clock="thread"`` set the thread count)."""
        self._cuda = torch.cuda.is_available()
        self._mps = torch.backends.mps.is_available()

    @classmethod
    def from_args(
        cls, name: str, args: argparse.Namespace, *, meta: dict[str, Any] | None = None
    ) -> Bench:
        """A bench configured from :func:`bench_parser` arguments."""
        return cls(name, BenchConfig.from_args(args), meta=meta)

    # -- timing -------------------------------------------------------------------------

    def _synchronize(self) -> None:
        # Kernels are asynchronous on accelerators: wait for queued work before reading the clock.
        if self._cuda and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        if self._mps:
            torch.mps.synchronize()

    def _sample(self, cand: Candidate, number: int) -> tuple[float, float | None]:
        """Seconds per call and work per call of ``number`` back-to-back calls."""
        fn = cand.fn
        # No candidate pays for the previous one's young garbage (a full collection costs ~0.1 s
        # with torch loaded, too slow to do per sample).
        gc.collect(1)
        before = _process_state()
        returned: list[object] = []
        self._synchronize()
        t0 = self._clock()
        if cand.returns_work:
            append = returned.append
            for _ in range(number):
                append(fn())
        else:
            for _ in range(number):
                fn()
        self._synchronize()
        elapsed = self._clock() - t0
        after = _process_state()
        if after != before:
            changed = "; ".join(
                f"{k} {before[k]} -> {after[k]}" for k in before if before[k] != after[k]
            )
            raise StokerError(
                f"candidate {cand.name!r} changed process state ({changed}); restore it inside "
                "the candidate so it cannot leak into the other candidates' timings"
            )
        if elapsed <= 0:
            raise StokerError(
                f"candidate {cand.name!r} took {elapsed} s for {number} calls; the clock did not "
                "advance, raise `number` so one sample lasts at least a millisecond"
            )
        work: float | None = None
        if cand.returns_work:
            work = sum(_work_value(cand.name, w) for w in returned) / number
        elif cand.work is not None:
            work = cand.work
        return elapsed / number, work

    def compare(
        self,
        name: str,
        candidates: Sequence[Candidate] | Mapping[str, Callable[[], object]],
        *,
        baseline: str | None = None,
        unit: str | None = None,
        number: int = 1,
        warmup: int | None = None,
        repeats: int | None = None,
    ) -> Comparison:
        """Run ``candidates`` interleaved and return (and print) their comparison.

        ``baseline`` names the candidate ratios refer to (default: the first). ``unit`` names
        the work (``"tokens"``) for the throughput column. ``number`` calls make one sample:
        raise it until a sample lasts >= ~10 ms. ``warmup``/``repeats`` override the config.
        """
        cands = (
            [Candidate(k, v) for k, v in candidates.items()]
            if isinstance(candidates, Mapping)
            else list(candidates)
        )
        names = [c.name for c in cands]
        if not cands:
            raise StokerError(f"comparison {name!r} has no candidates; pass at least one")
        if len(set(names)) != len(names):
            raise StokerError(f"comparison {name!r} has duplicate candidate names {names}")
        baseline = names[0] if baseline is None else baseline
        if baseline not in names:
            raise StokerError(f"baseline {baseline!r} is not a candidate; choose one of {names}")
        if number < 1:
            raise StokerError(f"number={number} calls per sample; pass at least 1")
        warmup = self.config.warmup if warmup is None else warmup
        repeats = self.config.repeats if repeats is None else repeats
        BenchConfig(warmup=warmup, repeats=repeats)  # validates both

        samples = {n: _Samples() for n in names}
        order: list[tuple[str, ...]] = []
        shuffle = _RoundOrder(len(cands))
        for phase, rounds in (("warmup", warmup), ("timed", repeats)):
            for _ in range(rounds):
                ordered = [cands[i] for i in shuffle.next()]
                if phase == "timed":
                    order.append(tuple(c.name for c in ordered))
                for cand in ordered:
                    seconds, work = self._sample(cand, number)
                    s = samples[cand.name]
                    if phase == "warmup":
                        s.warmup.append(seconds)
                    else:
                        s.seconds.append(seconds)
                        if work is not None:
                            s.work.append(work)

        base = samples[baseline]
        results = []
        for c in cands:
            s = samples[c.name]
            has_work = bool(s.work)
            ratios = [t / b for t, b in zip(s.seconds, base.seconds, strict=True)]
            if has_work and base.work:
                speedups = [
                    (w / t) / (bw / bt)
                    for w, t, bw, bt in zip(s.work, s.seconds, base.work, base.seconds, strict=True)
                ]
            else:
                speedups = [1.0 / r for r in ratios]
            results.append(
                CandidateResult(
                    name=c.name,
                    seconds=tuple(s.seconds),
                    warmup_seconds=tuple(s.warmup),
                    work=tuple(s.work) if has_work else None,
                    ratios=tuple(ratios),
                    speedups=tuple(speedups),
                )
            )
        comparison = Comparison(
            name=name,
            baseline=baseline,
            unit=unit,
            number=number,
            order=tuple(order),
            candidates=tuple(results),
        )
        self.comparisons.append(comparison)
        if self.console is not None:
            self.console.print(self.table(comparison))
        return comparison

    # -- output -------------------------------------------------------------------------

    def table(self, comparison: Comparison) -> Table:
        """The rich table for one comparison (printed by :meth:`compare`)."""
        unit = comparison.unit or "work"
        with_work = any(c.work is not None for c in comparison.candidates)
        table = Table(
            title=f"{self.name}: {comparison.name}"
            + ("  [quick]" if self.config.quick else "")
            + ("  [thread CPU time, 1 torch thread]" if self.config.clock == "thread" else ""),
            caption=(
                f"{len(comparison.order)} interleaved rounds x {comparison.number} call(s); "
                f"ratio = median over rounds of time / {comparison.baseline!r} time that round"
            ),
        )
        table.add_column("candidate")
        table.add_column("median / call", justify="right")
        table.add_column("min - max", justify="right")
        table.add_column("p10 - p90", justify="right")
        if with_work:
            table.add_column(f"{unit}/s", justify="right")
        table.add_column(f"x {comparison.baseline}", justify="right")
        table.add_column("ratio 95% CI", justify="right")
        for c in comparison.candidates:
            t = c.time
            row = [c.name, _fmt_s(t.median), f"{_fmt_s(t.min)} - {_fmt_s(t.max)}"]
            row.append(f"{_fmt_s(t.p10)} - {_fmt_s(t.p90)}")
            if with_work:
                thr = c.throughput
                row.append("-" if thr is None else _fmt_n(thr.median))
            r = summarize(c.ratios)
            if c.name == comparison.baseline:
                row += ["1.000 (baseline)", ""]
            else:
                row += [f"{r.median:.3f}", f"{r.median_lo:.3f} - {r.median_hi:.3f}"]
            table.add_row(*row)
        return table

    def to_dict(self) -> dict[str, Any]:
        return {
            "benchmark": self.name,
            "config": {
                "warmup": self.config.warmup,
                "repeats": self.config.repeats,
                "quick": self.config.quick,
                "clock": self.config.clock,
            },
            "meta": self.meta,
            "environment": self.environment,
            # The start's load average is in the environment; a busy machine makes noisy numbers.
            "load_average_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "comparisons": [c.to_dict() for c in self.comparisons],
        }

    def save(self, path: Path | str | None = None) -> Path | None:
        """Write the JSON (to ``path``, or ``<out_dir>/<name>-<UTC stamp>.json``); return it.

        Returns ``None`` without writing when ``out_dir`` is ``None`` and no ``path`` is given.
        """
        if path is None:
            if self.config.out_dir is None:
                return None
            stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            path = self.config.out_dir / f"{self.name}-{stamp}.json"
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1, default=str) + "\n")
        tmp.replace(path)
        if self.console is not None:
            self.console.print(f"[dim]wrote {path}[/dim]")
        return path

    def include(self, path: Path | str) -> list[Comparison]:
        """Add the comparisons of another run's JSON (e.g. a child process's) to this run."""
        data = json.loads(Path(path).read_text())
        added = [Comparison.from_dict(c) for c in data["comparisons"]]
        self.comparisons.extend(added)
        return added


def _work_value(name: str, value: object) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.item())  # after the clock stopped: a device sync here costs nothing
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise StokerError(
        f"candidate {name!r} has returns_work=True but returned {type(value).__name__} "
        f"{value!r:.40}; return the work of the call as a number or a one-element tensor"
    )


def autorange(
    fn: Callable[[], object], min_time: float = 0.02, max_number: int = 10_000, tries: int = 3
) -> int:
    """Calls of ``fn`` per sample so that one sample lasts at least ``min_time`` seconds.

    Use it for ``compare(number=...)`` when one call is too short to time on its own
    (perf_counter resolution, Python loop jitter); it calls ``fn`` a few times itself. Each
    candidate count is timed ``tries`` times and the fastest counts: one stalled call (a
    garbage collection, a neighbour on the VM) would otherwise end the search at far too few
    calls.
    """
    fn()  # the first call may pay one-time costs (allocation, lazy init)
    number = 1
    while number < max_number:
        fastest = math.inf
        for _ in range(tries):
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            fastest = min(fastest, time.perf_counter() - t0)
        if fastest >= min_time:
            break
        number *= 2
    return min(number, max_number)


def _fmt_s(seconds: float) -> str:
    for scale, suffix in ((1.0, "s"), (1e-3, "ms"), (1e-6, "us")):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {suffix}"
    return f"{seconds / 1e-9:.3g} ns"


def _fmt_n(value: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"
