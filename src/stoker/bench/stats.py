"""Order statistics of timing samples and a distribution-free confidence interval of the median."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from stoker.errors import StokerError

# ------------------------------------------------------------------------------------ stats


@dataclass(frozen=True, slots=True)
class Stats:
    """Order statistics of a sample (quantiles interpolate linearly, like numpy's default)."""

    n: int
    median: float
    min: float
    max: float
    p10: float
    p25: float
    p75: float
    p90: float
    p99: float
    mean: float
    median_lo: float
    """Lower end of a distribution-free 95% confidence interval of the median."""
    median_hi: float
    """Upper end of it; with fewer than 6 values the interval is the whole range."""


def _quantile(ordered: Sequence[float], q: float) -> float:
    # Linear interpolation between closest ranks: position q*(n-1), as numpy.quantile.
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _median_ci_ranks(n: int, confidence: float = 0.95) -> tuple[int, int]:
    """0-based ranks ``(lo, hi)`` of a distribution-free confidence interval of the median.

    The number of values below the true median is Binomial(n, 1/2); the interval is
    ``[x_(k), x_(n-k+1)]`` (1-based order statistics) for the largest k whose tail
    ``P(B <= k-1) <= (1 - confidence) / 2``. E.g. n=20: k=6, P(B <= 5) = 0.021, so the
    interval runs from the 6th to the 15th smallest value (Conover, Practical Nonparametric
    Statistics, 3rd ed., section 3.2).
    """
    tail = (1.0 - confidence) / 2.0
    k, cumulative = 0, 0.0
    while k < n:
        cumulative += math.comb(n, k) / 2.0**n  # P(B == k)
        if cumulative > tail:
            break
        k += 1
    if k == 0:  # too few values for this confidence: the whole range
        return 0, n - 1
    return k - 1, n - k


def summarize(values: Iterable[float]) -> Stats:
    """Median, min/max, p10/p25/p75/p90/p99 and mean of ``values`` (at least one)."""
    ordered = sorted(float(v) for v in values)
    if not ordered:
        raise StokerError("cannot summarize an empty sample; run at least one timed round")

    def q(p: float) -> float:
        return _quantile(ordered, p)

    lo, hi = _median_ci_ranks(len(ordered))

    return Stats(
        n=len(ordered),
        median=q(0.5),
        min=ordered[0],
        max=ordered[-1],
        p10=q(0.1),
        p25=q(0.25),
        p75=q(0.75),
        p90=q(0.9),
        p99=q(0.99),
        mean=sum(ordered) / len(ordered),
        median_lo=ordered[lo],
        median_hi=ordered[hi],
    )
