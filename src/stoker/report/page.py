"""The report page: one HTML string with its CSS and SVG inline, no script, no network.

Sections: summary, what differs (several runs), curves against step and wall-clock, validation,
then per run (:mod:`stoker.report.run_view`) the timeline, the doctor, the compressed forms of
its model (when ``stoker compress`` measured some) and the record. Text from
a run goes through :mod:`stoker.report.markup`, which escapes it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from stoker.records.diff import RunDiff
from stoker.report.load import Metric, RunData
from stoker.report.markup import CSP, CSS, Raw, diff_pre, duration, esc, json_text, table, when
from stoker.report.run_view import compression, doctor, markers, record, timeline
from stoker.report.svg import PALETTE, Series, line_chart

__all__ = ["render_page"]

_VALIDATION = re.compile(r"(^|[/_.\-])(val|valid|validation|eval|test)([/_.\-]|$)", re.I)
# Shown first, in this order, when logged: what people look at before anything else.
_FIRST = ("loss", "train/loss", "train_loss", "lr", "learning_rate", "tokens_per_s", "mfu")
# A run logging thousands of distinct keys still gets a page a browser opens quickly.
_MAX_CHARTED = 40


def _metric_order(names: Iterable[str]) -> list[str]:
    names = set(names)
    first = [n for n in _FIRST if n in names]
    return first + sorted(names - set(first))


def _legend(runs: Sequence[RunData]) -> str:
    if len(runs) < 2:
        return ""
    items = "".join(
        f'<span><i style="background:{PALETTE[i % len(PALETTE)]}"></i>{esc(r.id)}</span>'
        for i, r in enumerate(runs)
    )
    return f'<p class="legend">{items}</p>'


def _metric_figure(name: str, runs: Sequence[RunData], axis: str, dots: bool) -> str:
    series = []
    notes = []
    for i, run in enumerate(runs):
        m: Metric | None = run.metrics.get(name)
        if m is None:
            continue
        xs = m.steps if axis == "step" else m.times
        series.append(
            Series(
                name=f"{run.id}: {name}" if len(runs) > 1 else name,
                xs=xs,
                ys=m.values,
                colour=PALETTE[i % len(PALETTE)],
                breaks=m.breaks,  # a new attempt: not joined to the last one's line
                dots=dots,
            )
        )
        bad = m.non_finite
        if bad and axis == "step":
            first = m.steps[~np.isfinite(m.values)][0]
            where = f" (first at step {first:.0f})" if math.isfinite(first) else ""
            notes.append(f"{run.id if len(runs) > 1 else ''} {bad} non-finite value(s){where}")
    x_label = "step" if axis == "step" else "wall-clock since the run started (h:mm:ss)"
    chart = line_chart(
        series,
        title=f"{name} against {'step' if axis == 'step' else 'wall-clock'}",
        x_label=x_label,
        x_is_duration=axis == "time",
        markers=markers(runs, axis),
    )
    note = f' <span class="note">{esc("; ".join(n.strip() for n in notes))} not drawn</span>'
    return f"<figure><figcaption>{esc(name)}{note if notes else ''}</figcaption>{chart}</figure>"


def _curves(runs: Sequence[RunData], names: list[str], dots: bool) -> str:
    out = []
    for name in names:
        out.append(
            f'<h3 id="m-{esc(name)}">{esc(name)}</h3><div class="grid2">'
            + _metric_figure(name, runs, "step", dots)
            + _metric_figure(name, runs, "time", dots)
            + "</div>"
        )
    return "".join(out)


def _last_values(runs: Sequence[RunData], names: list[str]) -> str:
    """The last value of each metric per run (one run: also its finite min and max)."""
    if len(runs) > 1:
        rows = [[name, *(_last(r.metrics.get(name)) for r in runs)] for name in names]
        return table(rows, ["metric", *(r.id for r in runs)])
    rows = []
    for name in names:
        m = runs[0].metrics[name]
        finite = m.values[np.isfinite(m.values)]
        low, high = (float(finite.min()), float(finite.max())) if len(finite) else (None, None)
        rows.append([name, _last(m), low, high])
    return table(rows, ["metric", "last", "min", "max"])


def _last(m: Metric | None) -> float | None:
    if m is None or not len(m.values):
        return None
    return float(m.values[-1])


def _summary(runs: Sequence[RunData]) -> str:
    rows = []
    for r in runs:
        rec = r.record
        started = rec.get("started")
        loss = next((_last(r.metrics.get(k)) for k in _FIRST[:3] if k in r.metrics), None)
        steps = max(
            (float(np.nanmax(m.steps)) for m in r.metrics.values() if len(m.steps)), default=None
        )
        times = [float(np.nanmax(m.times)) for m in r.metrics.values() if len(m.times)]
        times = [t for t in times if math.isfinite(t)]
        checkpoints = sum(1 for e in r.events if e.kind == "checkpoint")
        rows.append(
            [
                r.id,
                rec.get("name"),
                Raw(f'<span class="status-{esc(r.status)}">{esc(r.status)}</span>'),
                when(started),
                duration(max(times) if times else None),
                None if steps is None else int(steps),
                loss,
                len(rec.get("attempts") or []),
                checkpoints,
                len((r.doctor or {}).get("findings") or []) if r.doctor else "-",
            ]
        )
    header = [
        "run",
        "name",
        "status",
        "started",
        "logged for",
        "last step",
        "last loss",
        "attempts",
        "checkpoints",
        "doctor findings",
    ]
    return table(rows, header)


def _differences(runs: Sequence[RunData], diffs: Sequence[RunDiff]) -> str:
    """One table: a row per key that differs between the first run and any other, a column
    per run (a run not in a pair's changes has the first run's value)."""
    rows: dict[tuple[str, str], list[Any]] = {}
    for j, d in enumerate(diffs, start=1):
        for section, changes in d.sections.items():
            for c in changes:
                row = rows.setdefault((section, c.key), [None] * len(runs))
                row[0] = c.a
                row[j] = c.b
    for (_section, _key), row in rows.items():
        for j in range(1, len(runs)):
            if row[j] is None and not any(
                c.key == _key for c in diffs[j - 1].sections.get(_section, [])
            ):
                row[j] = row[0]
    out = []
    if rows:
        table_rows = [
            [section, key, *(Raw(f"<code>{esc(json_text(v))}</code>") for v in values)]
            for (section, key), values in sorted(rows.items())
        ]
        out.append(table(table_rows, ["section", "key", *(r.id for r in runs)], cls="diff"))
    else:
        out.append("<p>No differences in config, settings, seeds, command, packages or host.</p>")
    for j, d in enumerate(diffs, start=1):
        if d.code:
            out.append(
                f"<details open><summary>code: {esc(runs[0].id)} → {esc(runs[j].id)} "
                f"({esc(d.code_note)})</summary>{diff_pre(d.code)}</details>"
            )
        else:
            out.append(
                f"<p>code {esc(runs[0].id)} → {esc(runs[j].id)}: identical "
                f"<span class='sub'>({esc(d.code_note)})</span></p>"
            )
    return "".join(out)


# ---------------------------------------------------------------------------------- page


def render_page(
    runs: Sequence[RunData], diffs: Sequence[RunDiff] = (), *, generated: str = ""
) -> str:
    """The whole report page for ``runs`` (``diffs``: the first run against each other)."""
    names = _metric_order({n for r in runs for n in r.metrics})
    validation = [n for n in names if _VALIDATION.search(n)]
    training = [n for n in names if n not in validation]
    compressed = any(r.compression for r in runs)
    title = "stoker report: " + (runs[0].id if len(runs) == 1 else " vs ".join(r.id for r in runs))
    body = [
        f"<h1>{esc(title)}</h1>",
        f'<p class="sub">{esc(generated)}</p>',
        '<nav><a href="#summary">summary</a>'
        + ('<a href="#differences">differences</a>' if len(runs) > 1 else "")
        + '<a href="#curves">curves</a><a href="#validation">validation</a>'
        '<a href="#timeline">timeline</a><a href="#doctor">doctor</a>'
        + ('<a href="#compression">compression</a>' if compressed else "")
        + '<a href="#record">record</a></nav>',
        '<h2 id="summary">Summary</h2>',
        _summary(runs),
    ]
    if len(runs) > 1:
        body += ['<h2 id="differences">What differs</h2>', _differences(runs, diffs)]
    body += ['<h2 id="curves">Training curves</h2>', _legend(runs)]
    if training:
        body += [_last_values(runs, training), _curves(runs, training[:_MAX_CHARTED], dots=False)]
        if len(training) > _MAX_CHARTED:
            left = len(training) - _MAX_CHARTED
            body.append(f"<p>{left} more metrics are in the table above, not charted.</p>")
    else:
        body.append("<p>No numeric metric was logged (<code>metrics.jsonl</code>).</p>")
    body.append('<h2 id="validation">Validation</h2>')
    if validation:
        body += [
            _last_values(runs, validation),
            _curves(runs, validation[:_MAX_CHARTED], dots=True),
        ]
    else:
        body.append(
            "<p>No validation metric was logged (names like <code>val_loss</code>, "
            "<code>eval/accuracy</code>).</p>"
        )
    body.append('<h2 id="timeline">Timeline</h2>')
    for run in runs:
        body += [f"<h3>{esc(run.id)}</h3>" if len(runs) > 1 else "", timeline(run)]
    body.append('<h2 id="doctor">Doctor</h2>')
    for run in runs:
        body += [f"<h3>{esc(run.id)}</h3>" if len(runs) > 1 else "", doctor(run)]
    if compressed:
        body.append('<h2 id="compression">Compression</h2>')
        for run in runs:
            body += [f"<h3>{esc(run.id)}</h3>" if len(runs) > 1 else "", compression(run)]
    body.append('<h2 id="record">Run record</h2>')
    for run in runs:
        body += [f"<h3>{esc(run.id)}</h3>" if len(runs) > 1 else "", record(run)]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>"
        + "".join(body)
        + "</main></body></html>\n"
    )
