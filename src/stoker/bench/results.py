"""What a comparison returns: per-candidate samples and the paired ratios to the baseline."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from stoker.bench.stats import Stats, summarize

# ---------------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class CandidateResult:
    """Samples of one candidate; every tuple has one entry per timed round."""

    name: str
    seconds: tuple[float, ...]
    """Seconds per call (sample time / number of calls)."""
    warmup_seconds: tuple[float, ...]
    """Seconds per call in the warm-up rounds (the first one includes compilation, if any)."""
    work: tuple[float, ...] | None
    """Work per call, or ``None`` if the candidate reports none."""
    ratios: tuple[float, ...]
    """``seconds / baseline seconds`` of the same round."""
    speedups: tuple[float, ...]
    """``throughput / baseline throughput`` of the same round (``baseline s / s`` without work)."""

    @property
    def time(self) -> Stats:
        return summarize(self.seconds)

    @property
    def median_s(self) -> float:
        return self.time.median

    @property
    def throughput(self) -> Stats | None:
        """Work per second, per round; ``None`` if no work is reported."""
        if self.work is None:
            return None
        return summarize(w / s for w, s in zip(self.work, self.seconds, strict=True))

    @property
    def ratio(self) -> float:
        """Median over rounds of time / baseline time (< 1: faster than the baseline)."""
        return summarize(self.ratios).median

    @property
    def speedup(self) -> float:
        """Median over rounds of throughput / baseline throughput (> 1: faster)."""
        return summarize(self.speedups).median

    def to_dict(self) -> dict[str, Any]:
        throughput = self.throughput
        return {
            "name": self.name,
            "time_s": asdict(self.time),
            "throughput_per_s": None if throughput is None else asdict(throughput),
            "ratio": asdict(summarize(self.ratios)),
            "speedup": asdict(summarize(self.speedups)),
            "seconds": list(self.seconds),
            "warmup_seconds": list(self.warmup_seconds),
            "work": None if self.work is None else list(self.work),
            "ratios": list(self.ratios),
            "speedups": list(self.speedups),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CandidateResult:
        work = d["work"]
        return cls(
            name=d["name"],
            seconds=tuple(d["seconds"]),
            warmup_seconds=tuple(d["warmup_seconds"]),
            work=None if work is None else tuple(work),
            ratios=tuple(d["ratios"]),
            speedups=tuple(d["speedups"]),
        )


@dataclass(frozen=True, slots=True)
class Comparison:
    """The result of :meth:`Bench.compare`; index it by candidate name."""

    name: str
    baseline: str
    unit: str | None
    number: int
    order: tuple[tuple[str, ...], ...]
    """Candidate order of each timed round, as run."""
    candidates: tuple[CandidateResult, ...]

    def __getitem__(self, name: str) -> CandidateResult:
        for c in self.candidates:
            if c.name == name:
                return c
        names = [c.name for c in self.candidates]
        raise KeyError(f"no candidate {name!r} in comparison {self.name!r}; have {names}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "baseline": self.baseline,
            "unit": self.unit,
            "number": self.number,
            "order": [list(o) for o in self.order],
            "candidates": [c.to_dict() for c in self.candidates],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Comparison:
        return cls(
            name=d["name"],
            baseline=d["baseline"],
            unit=d["unit"],
            number=d["number"],
            order=tuple(tuple(o) for o in d["order"]),
            candidates=tuple(CandidateResult.from_dict(c) for c in d["candidates"]),
        )
