"""Charts as inline SVG strings, drawn in Python: line charts and a stacked bar.

No plotting library and no script: the browser only has to draw ``<path>`` elements. Long
series are cut to what a screen can show with :func:`downsample`: the x range is split into
one bucket per pixel column and each bucket keeps its minimum and its maximum (in their
original order), so a one-step spike in a 100k-step loss curve is still drawn, at most
``2 * width`` points per series.

Every string that reaches the SVG (series names, axis labels, tooltips) is HTML-escaped here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

import numpy as np

__all__ = [
    "PALETTE",
    "Bar",
    "Marker",
    "Series",
    "downsample",
    "line_chart",
    "nice_ticks",
    "stacked_bar",
]

# Tableau 10: distinguishable, and readable by the common colour-blindnesses.
PALETTE = (
    "#4e79a7",
    "#f28e2b",
    "#e15759",
    "#76b7b2",
    "#59a14f",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#bab0ac",
)
_MARKER_COLOURS = {
    "checkpoint": "#8a8a8a",
    "start": "#f28e2b",
    "resume": "#f28e2b",
    "end": "#e15759",
}

WIDTH, HEIGHT = 540, 220
_LEFT, _RIGHT, _TOP, _BOTTOM = 58, 12, 10, 34  # px of margin around the plot area


@dataclass(slots=True)
class Series:
    """One curve: ``xs`` and ``ys`` of equal length (float arrays; non-finite ys not drawn).

    ``breaks``: indices where a new segment starts (the step went back after a resume), so
    the line is not drawn back across the chart.
    """

    name: str
    xs: np.ndarray
    ys: np.ndarray
    colour: str = PALETTE[0]
    breaks: Sequence[int] = ()
    dots: bool = False
    """Draw a dot at each point too (a validation metric logged a few times)."""


@dataclass(frozen=True, slots=True)
class Marker:
    """A vertical line at ``x``: a checkpoint, a resume, the end of an attempt."""

    x: float
    kind: str
    """``"checkpoint"``, ``"start"``, ``"resume"`` or ``"end"`` (its colour)."""
    label: str


@dataclass(frozen=True, slots=True)
class Bar:
    """One part of a stacked bar: ``value`` in the chart's unit."""

    label: str
    value: float
    colour: str


def downsample(xs: np.ndarray, ys: np.ndarray, buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ``2 * buckets`` points of ``(xs, ys)`` that draw the same picture.

    ``xs`` must be non-decreasing and ``ys`` finite. The x range is split into ``buckets``
    equal intervals (one per pixel column); each non-empty one keeps the index of its minimum
    and of its maximum, in index order. For ``ys = [0, 0, 9, 0, 0, 0]`` at ``xs = 0..5`` and 2
    buckets, bucket 0 holds indices 0-2 (keeps 0 and 2: the spike), bucket 1 indices 3-5
    (keeps 3 only: min and max are the same point):

    >>> xs, ys = downsample(np.arange(6.0), np.array([0, 0, 9, 0, 0, 0.0]), 2)
    >>> xs.tolist(), ys.tolist()
    ([0.0, 2.0, 3.0], [0.0, 9.0, 0.0])
    """
    n = len(xs)
    if n <= 2 * buckets:
        return xs, ys
    lo, hi = float(xs[0]), float(xs[-1])
    span = hi - lo
    if span <= 0:
        idx = np.unique([int(np.argmin(ys)), int(np.argmax(ys))])
        return xs[idx], ys[idx]
    # Bucket of each point; non-decreasing because xs is, so each bucket is one run of indices.
    b = np.minimum(((xs - lo) * (buckets / span)).astype(np.int64), buckets - 1)
    starts = np.flatnonzero(np.r_[True, b[1:] != b[:-1]])
    # argmin/argmax within each run: sort by (bucket, value) once, then take each run's ends.
    order_min = np.lexsort((ys, b))
    order_max = np.lexsort((-ys, b))
    ends = np.r_[starts[1:], n]
    counts = ends - starts
    first = np.cumsum(np.r_[0, counts[:-1]])
    keep = np.unique(np.r_[order_min[first], order_max[first]])  # sorted: index order
    return xs[keep], ys[keep]


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values inside ``[lo, hi]``: steps of 1, 2 or 5 times a power of ten, the one
    giving closest to ``count`` ticks.

    >>> nice_ticks(0, 97)
    [0, 20, 40, 60, 80]
    >>> nice_ticks(0.31, 0.58)
    [0.35, 0.4, 0.45, 0.5, 0.55]
    """
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo] if math.isfinite(lo) else []
    raw = (hi - lo) / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = min((m * power for m in (1, 2, 5, 10)), key=lambda v: abs(math.log(v / raw)))
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    t = first
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    return ticks


def _fmt_number(v: float) -> str:
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 1e6:
        return f"{v / 1e6:.3g}M"
    if a >= 1e4:
        return f"{v / 1e3:.3g}k"
    if a >= 0.01:
        return f"{v:.4g}"
    return f"{v:.2g}"


def _fmt_duration(seconds: float) -> str:
    s = round(seconds)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def _duration_ticks(lo: float, hi: float) -> list[float]:
    # Seconds, minutes or hours in round amounts (0:30, 1:00, ...), not 0:17, 0:34.
    span = hi - lo
    for step in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400, 21600):
        if span / step <= 6:
            break
    else:
        step = 43200
    first = math.ceil(lo / step) * step
    return [float(t) for t in range(int(first), int(hi) + 1, step)]


def _path(px: np.ndarray, py: np.ndarray, breaks: Sequence[int]) -> str:
    """``M x y L x y ...``, restarting with ``M`` at each break and after each gap."""
    parts = []
    start = True
    breaks_set = set(breaks)
    for i, (x, y) in enumerate(zip(px.tolist(), py.tolist(), strict=True)):
        if i in breaks_set:
            start = True
        parts.append(f"{'M' if start else 'L'}{x:.1f} {y:.1f}")
        start = False
    return " ".join(parts)


def line_chart(
    series: Sequence[Series],
    *,
    title: str,
    x_label: str,
    x_is_duration: bool = False,
    markers: Sequence[Marker] = (),
    width: int = WIDTH,
    height: int = HEIGHT,
) -> str:
    """An SVG line chart of ``series`` on shared axes, with vertical ``markers``.

    Non-finite y values are left out (the caller says how many); a y range spanning more than
    two decades of positive values is drawn on a log scale (a loss from 10 to 0.01).
    """
    plot_w = width - _LEFT - _RIGHT
    plot_h = height - _TOP - _BOTTOM
    prepared = []
    for s in series:
        ok = np.isfinite(s.ys) & np.isfinite(s.xs)
        prepared.append((s, ok))
    all_x = [s.xs[ok] for s, ok in prepared if ok.any()]
    all_y = [s.ys[ok] for s, ok in prepared if ok.any()]
    out = [
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{escape(title)}"><title>{escape(title)}</title>'
    ]
    if not all_x:
        out.append(
            f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" class="empty">'
            "no finite values</text></svg>"
        )
        return "".join(out)
    xv, yv = np.concatenate(all_x), np.concatenate(all_y)
    x_lo, x_hi = float(xv.min()), float(xv.max())
    marker_xs = [m.x for m in markers if math.isfinite(m.x)]
    if marker_xs:
        x_lo, x_hi = min(x_lo, *marker_xs), max(x_hi, *marker_xs)
    if x_hi <= x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    y_lo, y_hi = float(yv.min()), float(yv.max())
    log = y_lo > 0 and y_hi / y_lo > 100
    if log:
        y_lo, y_hi = math.log10(y_lo), math.log10(y_hi)
    if y_hi <= y_lo:
        pad = abs(y_lo) * 0.05 or 1.0
        y_lo, y_hi = y_lo - pad, y_hi + pad
    else:
        pad = (y_hi - y_lo) * 0.04
        y_lo, y_hi = y_lo - pad, y_hi + pad

    def sx(x: np.ndarray | float) -> np.ndarray | float:
        return _LEFT + (x - x_lo) * (plot_w / (x_hi - x_lo))

    def sy(y: np.ndarray | float) -> np.ndarray | float:
        if log:
            y = np.log10(y)
        return _TOP + plot_h - (y - y_lo) * (plot_h / (y_hi - y_lo))

    # Axes and grid.
    out.append(f'<rect x="{_LEFT}" y="{_TOP}" width="{plot_w}" height="{plot_h}" class="plot"/>')
    if log:
        decades = range(math.floor(y_lo), math.ceil(y_hi) + 1)
        steps = (1,) if len(decades) > 4 else (1, 2, 5)  # 1-2-5 ticks on a short log axis
        y_ticks = [m * 10.0**e for e in decades for m in steps if y_lo <= math.log10(m) + e <= y_hi]
    else:
        y_ticks = nice_ticks(y_lo, y_hi)
    for t in y_ticks:
        y = float(sy(t))
        out.append(
            f'<line x1="{_LEFT}" x2="{_LEFT + plot_w}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
            f'<text x="{_LEFT - 4}" y="{y + 3:.1f}" text-anchor="end">{_fmt_number(t)}</text>'
        )
    x_ticks = _duration_ticks(x_lo, x_hi) if x_is_duration else nice_ticks(x_lo, x_hi, 6)
    fmt = _fmt_duration if x_is_duration else _fmt_number
    for t in x_ticks:
        x = float(sx(t))
        out.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{_TOP}" y2="{_TOP + plot_h}" class="grid"/>'
            f'<text x="{x:.1f}" y="{_TOP + plot_h + 13}" text-anchor="middle">{fmt(t)}</text>'
        )
    out.append(
        f'<text x="{_LEFT + plot_w / 2}" y="{height - 4}" text-anchor="middle" '
        f'class="label">{escape(x_label)}{" (log y)" if log else ""}</text>'
    )
    for m in markers:
        if not math.isfinite(m.x):
            continue
        x = float(sx(m.x))
        colour = _MARKER_COLOURS.get(m.kind, "#888")
        out.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{_TOP}" y2="{_TOP + plot_h}" '
            f'class="marker {escape(m.kind)}" stroke="{colour}"><title>{escape(m.label)}</title>'
            "</line>"
        )
    # Curves: each finite segment downsampled to 2 points per pixel column.
    for s, ok in prepared:
        if not ok.any():
            continue
        xs, ys = s.xs[ok], s.ys[ok]
        # Segments of the kept points: a break in the original indices, or after a gap of
        # non-finite values, starts a new one.
        kept_index = np.flatnonzero(ok)
        gaps = (np.flatnonzero(np.diff(kept_index) > 1) + 1).tolist()
        resumed = np.searchsorted(kept_index, list(s.breaks)).tolist()
        seg_starts = sorted({0, *gaps, *resumed})
        seg_starts = [i for i in seg_starts if i < len(xs)]
        px_parts, py_parts, new_breaks = [], [], []
        count = 0
        for a, b in zip(seg_starts, [*seg_starts[1:], len(xs)], strict=True):
            seg_x, seg_y = xs[a:b], ys[a:b]
            if (np.diff(seg_x) < 0).any():  # downsample needs x in order
                order = np.argsort(seg_x, kind="stable")
                seg_x, seg_y = seg_x[order], seg_y[order]
            buckets = max(1, round(plot_w * (seg_x[-1] - seg_x[0]) / (x_hi - x_lo)))
            dx, dy = downsample(seg_x, seg_y, buckets)
            new_breaks.append(count)
            count += len(dx)
            px_parts.append(sx(dx))
            py_parts.append(sy(dy))
        px, py = np.concatenate(px_parts), np.concatenate(py_parts)
        out.append(
            f'<path class="curve" d="{_path(px, py, new_breaks)}" stroke="{s.colour}">'
            f"<title>{escape(s.name)}</title></path>"
        )
        if s.dots and len(px) <= 400:
            out.extend(
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{s.colour}"/>'
                for x, y in zip(px.tolist(), py.tolist(), strict=True)
            )
    out.append("</svg>")
    return "".join(out)


def stacked_bar(bars: Sequence[Bar], *, title: str, unit: str = "ms", width: int = WIDTH) -> str:
    """One horizontal bar split into ``bars`` (the step-time breakdown), with a legend."""
    total = sum(max(0.0, b.value) for b in bars)
    plot_w = width - 2
    # Legend entries laid out left to right, wrapping: (x, row) of each.
    legend, lx, row = [], 1.0, 0
    for b in bars:
        label = f"{b.label} {max(0.0, b.value):.1f} {unit}"
        needed = 14 + 6.4 * len(label) + 12
        if lx > 1.0 and lx + needed > width:
            lx, row = 1.0, row + 1
        legend.append((lx, row, label, b.colour))
        lx += needed
    height = 40 + 16 * (row + 1)
    out = [
        f'<svg class="chart bar" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{escape(title)}"><title>{escape(title)}</title>'
    ]
    x = 1.0
    for b in bars:
        value = max(0.0, b.value)
        if total <= 0 or value <= 0:
            continue
        w = plot_w * value / total
        share = 100 * value / total
        tip = f"{b.label}: {value:.2f} {unit} ({share:.0f}%)"
        out.append(
            f'<rect x="{x:.1f}" y="2" width="{w:.1f}" height="26" fill="{b.colour}">'
            f"<title>{escape(tip)}</title></rect>"
        )
        if w > 40:
            out.append(
                f'<text x="{x + w / 2:.1f}" y="19" text-anchor="middle" class="inbar">'
                f"{share:.0f}%</text>"
            )
        x += w
    for lx, row, label, colour in legend:
        y = 40 + 16 * row
        out.append(
            f'<rect x="{lx:.1f}" y="{y}" width="10" height="10" fill="{colour}"/>'
            f'<text x="{lx + 14:.1f}" y="{y + 9}">{escape(label)}</text>'
        )
    out.append("</svg>")
    return "".join(out)
