"""The report page: one HTML string with its CSS and SVG inline, no script, no network.

Sections: summary, what differs (several runs), curves against step and wall-clock, validation,
progress and the timeline (checkpoints, resumes, the end), the doctor (step-time breakdown,
findings with their code lines), the run record (command, revision, diff, config, packages,
hardware). Everything from a run is text to escape (:func:`_e`); the page's Content-Security-
Policy forbids scripts and every fetch, so an escaping slip still could not run code or call
out.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
import shlex
from collections.abc import Iterable, Sequence
from html import escape
from typing import Any

import numpy as np

from stoker.records.diff import RunDiff, flatten
from stoker.report.load import Metric, RunData
from stoker.report.svg import PALETTE, Bar, Marker, Series, line_chart, stacked_bar

__all__ = ["CSP", "render_page"]

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
_VALIDATION = re.compile(r"(^|[/_.\-])(val|valid|validation|eval|test)([/_.\-]|$)", re.I)
# Shown first, in this order, when logged: what people look at before anything else.
_FIRST = ("loss", "train/loss", "train_loss", "lr", "learning_rate", "tokens_per_s", "mfu")
_PHASE_COLOURS = {
    "data": "#e15759",
    "forward": "#4e79a7",
    "backward": "#76b7b2",
    "optimizer": "#59a14f",
    "host_sync": "#f28e2b",
    "other": "#bab0ac",
}
_PHASE_LABELS = {
    "data": "waiting for data",
    "forward": "forward",
    "backward": "backward",
    "optimizer": "optimizer",
    "host_sync": "host-sync stalls",
    "other": "other / idle",
}
_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d2433;
background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:16px 24px 48px}
h1{font-size:22px;margin:8px 0 2px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid
#d6d9de;padding-bottom:4px}h3{font-size:15px;margin:18px 0 6px}
.sub{color:#5b6475}.grid2{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;background:#fff;border:1px solid #e1e4e8;border-radius:6px;padding:8px}
figcaption{font-weight:600;font-size:13px;margin:0 0 2px 4px}
figcaption .note{font-weight:400;color:#b03a2e}
table{border-collapse:collapse;background:#fff;margin:4px 0 8px}
td,th{border:1px solid #e1e4e8;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#eef0f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
code,pre{font:12px/1.4 ui-monospace,"SFMono-Regular",Menlo,monospace}
pre{background:#fff;border:1px solid #e1e4e8;padding:8px;overflow:auto;max-height:480px;
margin:4px 0}
pre.diff .add{color:#22863a;background:#f0fff4}pre.diff .del{color:#b31d28;background:#ffeef0}
pre.diff .hunk{color:#6f42c1}
.legend span{display:inline-block;margin-right:14px}.legend i{display:inline-block;width:12px;
height:3px;margin-right:5px;vertical-align:middle}
.sev-high{color:#b31d28;font-weight:600}.sev-medium{color:#b06d00;font-weight:600}
.status-finished{color:#22863a}.status-failed,.status-killed{color:#b31d28}
.status-running{color:#0366d6}
svg.chart{display:block;font:10px system-ui,sans-serif}
svg.chart .plot{fill:#fff;stroke:#c9ced6}svg.chart .grid{stroke:#eceef1}
svg.chart text{fill:#5b6475}svg.chart .label{fill:#1d2433;font-size:11px}
svg.chart .curve{fill:none;stroke-width:1.4;stroke-linejoin:round}
svg.chart .marker{stroke-width:1;stroke-dasharray:3 3}svg.chart .marker.resume,
svg.chart .marker.end{stroke-width:1.6}
svg.chart .inbar{fill:#fff;font-weight:600}
details>summary{cursor:pointer;color:#0366d6}
nav a{margin-right:12px}
"""


def _e(value: Any) -> str:
    """Escaped text of anything from a run (quotes too: safe inside attributes)."""
    return escape(value if isinstance(value, str) else str(value), quote=True)


def _json(value: Any) -> str:
    return json.dumps(value, default=str, ensure_ascii=False)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    return "-" if value is None else str(value)


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    s = round(seconds)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def _when(text: Any) -> str:
    if not isinstance(text, str):
        return "-"
    try:
        return _dt.datetime.fromisoformat(text).strftime("%Y-%m-%d %H:%M:%S %Z").strip()
    except ValueError:
        return text


def _table(rows: Iterable[Sequence[Any]], header: Sequence[str] = (), cls: str = "") -> str:
    out = [f'<table class="{cls}">' if cls else "<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>")
    for row in rows:
        out.append("<tr>" + "".join(_cell(c) for c in row) + "</tr>")
    out.append("</table>")
    return "".join(out)


class _Raw(str):
    """Markup built here (already escaped), put into a table cell as is."""


def _cell(value: Any) -> str:
    if isinstance(value, _Raw):
        return f"<td>{value}</td>"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f'<td class="num">{_e(_fmt(value))}</td>'
    return f"<td>{_e(_fmt(value))}</td>"


# ----------------------------------------------------------------------------- sections


def _metric_order(names: Iterable[str]) -> list[str]:
    names = set(names)
    first = [n for n in _FIRST if n in names]
    return first + sorted(names - set(first))


def _markers(runs: Sequence[RunData], axis: str) -> list[Marker]:
    out = []
    for run in runs:
        prefix = f"{run.id}: " if len(runs) > 1 else ""
        for ev in run.events:
            x = ev.step if axis == "step" else ev.time
            if math.isfinite(x):
                out.append(Marker(x, ev.kind, prefix + ev.label))
    return out


def _legend(runs: Sequence[RunData]) -> str:
    if len(runs) < 2:
        return ""
    items = "".join(
        f'<span><i style="background:{PALETTE[i % len(PALETTE)]}"></i>{_e(r.id)}</span>'
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
        markers=_markers(runs, axis),
    )
    note = f' <span class="note">{_e("; ".join(n.strip() for n in notes))} not drawn</span>'
    return f"<figure><figcaption>{_e(name)}{note if notes else ''}</figcaption>{chart}</figure>"


def _curves(runs: Sequence[RunData], names: list[str], dots: bool) -> str:
    out = []
    for name in names:
        out.append(
            f'<h3 id="m-{_e(name)}">{_e(name)}</h3><div class="grid2">'
            + _metric_figure(name, runs, "step", dots)
            + _metric_figure(name, runs, "time", dots)
            + "</div>"
        )
    return "".join(out)


def _last_values(runs: Sequence[RunData], names: list[str]) -> str:
    """The last value of each metric per run (one run: also its finite min and max)."""
    if len(runs) > 1:
        rows = [[name, *(_last(r.metrics.get(name)) for r in runs)] for name in names]
        return _table(rows, ["metric", *(r.id for r in runs)])
    rows = []
    for name in names:
        m = runs[0].metrics[name]
        finite = m.values[np.isfinite(m.values)]
        low, high = (float(finite.min()), float(finite.max())) if len(finite) else (None, None)
        rows.append([name, _last(m), low, high])
    return _table(rows, ["metric", "last", "min", "max"])


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
                _Raw(f'<span class="status-{_e(r.status)}">{_e(r.status)}</span>'),
                _when(started),
                _duration(max(times) if times else None),
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
    return _table(rows, header)


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
            [section, key, *(_Raw(f"<code>{_e(_json(v))}</code>") for v in values)]
            for (section, key), values in sorted(rows.items())
        ]
        out.append(_table(table_rows, ["section", "key", *(r.id for r in runs)], cls="diff"))
    else:
        out.append("<p>No differences in config, settings, seeds, command, packages or host.</p>")
    for j, d in enumerate(diffs, start=1):
        if d.code:
            out.append(
                f"<details open><summary>code: {_e(runs[0].id)} → {_e(runs[j].id)} "
                f"({_e(d.code_note)})</summary>{_diff_pre(d.code)}</details>"
            )
        else:
            out.append(
                f"<p>code {_e(runs[0].id)} → {_e(runs[j].id)}: identical "
                f"<span class='sub'>({_e(d.code_note)})</span></p>"
            )
    return "".join(out)


def _diff_pre(text: str) -> str:
    lines = []
    for line in text.splitlines():
        cls = (
            "hunk"
            if line.startswith("@@")
            else "add"
            if line.startswith("+") and not line.startswith("+++")
            else "del"
            if line.startswith("-") and not line.startswith("---")
            else ""
        )
        lines.append(f'<span class="{cls}">{_e(line)}</span>' if cls else _e(line))
    return '<pre class="diff">' + "\n".join(lines) + "</pre>"


def _timeline(run: RunData) -> str:
    """Progress (step against wall-clock) with every event on it, and the events as a table."""
    out = []
    steps = [m for m in run.metrics.values() if len(m.steps)]
    if steps:
        longest = max(steps, key=lambda m: len(m.steps))
        chart = line_chart(
            [Series("step", longest.times, longest.steps, PALETTE[4], breaks=longest.breaks)],
            title=f"{run.id}: step against wall-clock",
            x_label="wall-clock since the run started (h:mm:ss)",
            x_is_duration=True,
            markers=_markers([run], "time"),
        )
        out.append(
            f"<figure><figcaption>progress: step against wall-clock (checkpoints grey, resumes "
            f"orange, failure red)</figcaption>{chart}</figure>"
        )
    rows = [
        [e.kind, None if not math.isfinite(e.step) else int(e.step), _duration(e.time), e.label]
        for e in sorted(run.events, key=lambda e: (e.time if math.isfinite(e.time) else 0, e.step))
    ]
    if rows:
        out.append(_table(rows, ["event", "step", "at", "what"]))
    else:
        out.append("<p>No checkpoint, resume or failure recorded.</p>")
    return "".join(out)


def _doctor(run: RunData) -> str:
    doc = run.doctor
    if doc is None:
        return "<p>No <code>doctor.json</code> in this run (the doctor was off).</p>"
    s = doc.get("summary") or {}
    out = []
    step_ms = s.get("step_ms")
    head = f"{_fmt(s.get('profiled_steps'))} profiled steps on {_fmt(s.get('device'))}"
    if isinstance(step_ms, int | float):
        head += f", {step_ms:.1f} ms per step"
    if isinstance(s.get("unprofiled_step_ms"), int | float):
        head += f" ({s['unprofiled_step_ms']:.1f} ms unprofiled)"
    out.append(f"<p>{_e(head)}</p>")
    if s.get("hardware_favours"):
        out.append(f"<p>This hardware favours {_e(s['hardware_favours'])}.</p>")
    phases = s.get("phases_ms") or {}
    if isinstance(phases, dict) and phases:
        bars = [
            Bar(_PHASE_LABELS.get(str(k), str(k)), float(v), _PHASE_COLOURS.get(str(k), "#9c755f"))
            for k, v in phases.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        ]
        out.append(
            "<figure><figcaption>where the step goes</figcaption>"
            + stacked_bar(bars, title=f"{run.id}: step-time breakdown")
            + "</figure>"
        )
    findings = [f for f in doc.get("findings") or [] if isinstance(f, dict)]
    if not findings:
        out.append("<p><b>No findings</b>: nothing in this loop is worth changing.</p>")
        return "".join(out)
    rows = []
    for i, f in enumerate(findings, 1):
        share = f.get("share")
        cost = f"~{100 * share:.0f}% of step" if isinstance(share, int | float) else "unmeasured"
        loc = f.get("location")
        where = "-"
        if isinstance(loc, str):
            where = f"<code>{_e(loc)}</code>"
            if loc in run.sources:
                where += f"<pre>{_e(run.sources[loc])}</pre>"
        sev = str(f.get("severity", ""))
        rows.append(
            [
                i,
                _Raw(f'<b class="sev-{_e(sev)}">{_e(f.get("code"))}</b><br>{_e(sev)}'),
                cost,
                _Raw(where),
                f.get("title"),
                f.get("fix"),
            ]
        )
    out.append(_table(rows, ["#", "finding", "cost", "your code", "what", "fix"], cls="findings"))
    return "".join(out)


def _kv(pairs: Iterable[tuple[str, Any]]) -> str:
    return _table(
        ([k, _Raw(f"<code>{_e(v if isinstance(v, str) else _json(v))}</code>")] for k, v in pairs),
        ["key", "value"],
    )


def _record(run: RunData) -> str:
    rec = run.record
    cmd = rec.get("command") or {}
    git = rec.get("git") or {}
    argv = cmd.get("orig_argv") or cmd.get("argv") or []
    command = shlex.join(str(a) for a in argv) if isinstance(argv, list) else str(argv)
    revision = "-"
    if git:
        revision = f"{git.get('revision') or '-'} ({git.get('branch') or 'detached'})"
        revision += f", dirty: {git.get('patch')}" if git.get("dirty") else ", clean"
    out = [
        _table(
            [
                ["command", _Raw(f"<code>{_e(command)}</code>")],
                ["working directory", cmd.get("cwd")],
                ["launcher", " ".join(map(str, cmd.get("launcher") or [])) or "-"],
                ["git revision", revision],
                ["repository", git.get("repo") if git else "-"],
                ["started", _when(rec.get("started"))],
                ["ended", _when(rec.get("ended"))],
                ["status", run.status],
                ["world size", _fmt(rec.get("world_size"))],
                ["directory", str(run.dir)],
            ]
        )
    ]
    error = rec.get("error")
    if isinstance(error, dict) and error:
        out.append(
            f"<h3>error</h3><p><b>{_e(error.get('type') or '')}</b>: {_e(error.get('message'))}</p>"
        )
        if error.get("traceback"):
            out.append(f"<pre>{_e(error['traceback'])}</pre>")
    if run.patch:
        cut = f" ({run.patch_cut} more bytes not shown)" if run.patch_cut else ""
        out.append(f"<h3>uncommitted changes (code.patch){_e(cut)}</h3>{_diff_pre(run.patch)}")
    attempts = [a for a in rec.get("attempts") or [] if isinstance(a, dict)]
    if len(attempts) > 1:
        rows = []
        for i, a in enumerate(attempts, 1):
            resumed = a.get("resumed_from")
            step = resumed.get("step") if isinstance(resumed, dict) else None
            argv = a.get("argv")
            line = shlex.join(map(str, argv)) if isinstance(argv, list) else _fmt(argv)
            rows.append(
                [i, _when(a.get("started")), a.get("host"), step, _Raw(f"<code>{_e(line)}</code>")]
            )
        out.append(
            "<h3>attempts</h3>"
            + _table(rows, ["#", "started", "host", "resumed from step", "argv"])
        )
    tables = []
    for section in ("config", "settings", "seeds", "versions", "host"):
        value = rec.get(section)
        if value:
            tables.append(f"<div><h3>{section}</h3>" + _kv(flatten(value).items()) + "</div>")
    out.append('<div class="grid2">' + "".join(tables) + "</div>")
    packages = rec.get("packages") or {}
    if isinstance(packages, dict) and packages:
        out.append(
            f"<details><summary>packages ({len(packages)})</summary>"
            + _table(
                sorted(([k, v] for k, v in packages.items()), key=lambda r: str(r[0])),
                ["package", "version"],
            )
            + "</details>"
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
    title = "stoker report: " + (runs[0].id if len(runs) == 1 else " vs ".join(r.id for r in runs))
    body = [
        f"<h1>{_e(title)}</h1>",
        f'<p class="sub">{_e(generated)}</p>',
        '<nav><a href="#summary">summary</a>'
        + ('<a href="#differences">differences</a>' if len(runs) > 1 else "")
        + '<a href="#curves">curves</a><a href="#validation">validation</a>'
        '<a href="#timeline">timeline</a><a href="#doctor">doctor</a>'
        '<a href="#record">record</a></nav>',
        '<h2 id="summary">Summary</h2>',
        _summary(runs),
    ]
    if len(runs) > 1:
        body += ['<h2 id="differences">What differs</h2>', _differences(runs, diffs)]
    body += ['<h2 id="curves">Training curves</h2>', _legend(runs)]
    if training:
        body += [_last_values(runs, training), _curves(runs, training, dots=False)]
    else:
        body.append("<p>No numeric metric was logged (<code>metrics.jsonl</code>).</p>")
    body.append('<h2 id="validation">Validation</h2>')
    if validation:
        body += [_last_values(runs, validation), _curves(runs, validation, dots=True)]
    else:
        body.append(
            "<p>No validation metric was logged (names like <code>val_loss</code>, "
            "<code>eval/accuracy</code>).</p>"
        )
    body.append('<h2 id="timeline">Timeline</h2>')
    for run in runs:
        body += [f"<h3>{_e(run.id)}</h3>" if len(runs) > 1 else "", _timeline(run)]
    body.append('<h2 id="doctor">Doctor</h2>')
    for run in runs:
        body += [f"<h3>{_e(run.id)}</h3>" if len(runs) > 1 else "", _doctor(run)]
    body.append('<h2 id="record">Run record</h2>')
    for run in runs:
        body += [f"<h3>{_e(run.id)}</h3>" if len(runs) > 1 else "", _record(run)]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><main>"
        + "".join(body)
        + "</main></body></html>\n"
    )
