"""The sections about one run: its timeline (checkpoints, resumes, the end), the doctor's
step-time breakdown and findings with their code lines, and its record."""

from __future__ import annotations

import math
import shlex
from collections.abc import Sequence

import numpy as np

from stoker.records.diff import flatten
from stoker.report.load import RunData
from stoker.report.markup import Raw, diff_pre, duration, esc, fmt, kv, table, when
from stoker.report.svg import PALETTE, Bar, Marker, Series, line_chart, stacked_bar

__all__ = ["doctor", "markers", "record", "timeline"]

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


def markers(runs: Sequence[RunData], axis: str) -> list[Marker]:
    """The runs' events as vertical lines on the ``"step"`` or ``"time"`` axis (an event not
    placed on that axis is left out); with several runs, each label names its run."""
    out = []
    for run in runs:
        prefix = f"{run.id}: " if len(runs) > 1 else ""
        for ev in run.events:
            x = ev.step if axis == "step" else ev.time
            if math.isfinite(x):
                out.append(Marker(x, ev.kind, prefix + ev.label))
    return out


def timeline(run: RunData) -> str:
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
            markers=markers([run], "time"),
        )
        out.append(
            f"<figure><figcaption>progress: step against wall-clock (checkpoints grey, resumes "
            f"orange, failure red)</figcaption>{chart}</figure>"
        )
    rows = [
        [e.kind, None if not math.isfinite(e.step) else int(e.step), duration(e.time), e.label]
        for e in sorted(run.events, key=lambda e: (e.time if math.isfinite(e.time) else 0, e.step))
    ]
    if rows:
        out.append(table(rows, ["event", "step", "at", "what"]))
    else:
        out.append("<p>No checkpoint, resume or failure recorded.</p>")
    return "".join(out)


def doctor(run: RunData) -> str:
    """The doctor's summary line, the step-time breakdown as a bar, and the findings with the
    line of code each is about (when :func:`~stoker.report.load.load_run` could read it)."""
    doc = run.doctor
    if doc is None:
        return "<p>No <code>doctor.json</code> in this run (the doctor was off).</p>"
    s = doc.get("summary") or {}
    out = []
    step_ms = s.get("step_ms")
    head = f"{fmt(s.get('profiled_steps'))} profiled steps on {fmt(s.get('device'))}"
    if isinstance(step_ms, int | float):
        head += f", {step_ms:.1f} ms per step"
    if isinstance(s.get("unprofiled_step_ms"), int | float):
        head += f" ({s['unprofiled_step_ms']:.1f} ms unprofiled)"
    out.append(f"<p>{esc(head)}</p>")
    if s.get("hardware_favours"):
        out.append(f"<p>This hardware favours {esc(s['hardware_favours'])}.</p>")
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
            where = f"<code>{esc(loc)}</code>"
            if loc in run.sources:
                where += f"<pre>{esc(run.sources[loc])}</pre>"
        sev = str(f.get("severity", ""))
        rows.append(
            [
                i,
                Raw(f'<b class="sev-{esc(sev)}">{esc(f.get("code"))}</b><br>{esc(sev)}'),
                cost,
                Raw(where),
                f.get("title"),
                f.get("fix"),
            ]
        )
    out.append(table(rows, ["#", "finding", "cost", "your code", "what", "fix"], cls="findings"))
    return "".join(out)


def record(run: RunData) -> str:
    """The run record: command, revision, error, ``code.patch``, attempts, config, settings,
    seeds, versions, host and packages."""
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
        table(
            [
                ["command", Raw(f"<code>{esc(command)}</code>")],
                ["working directory", cmd.get("cwd")],
                ["launcher", " ".join(map(str, cmd.get("launcher") or [])) or "-"],
                ["git revision", revision],
                ["repository", git.get("repo") if git else "-"],
                ["started", when(rec.get("started"))],
                ["ended", when(rec.get("ended"))],
                ["status", run.status],
                ["world size", fmt(rec.get("world_size"))],
                ["directory", str(run.dir)],
            ]
        )
    ]
    error = rec.get("error")
    if isinstance(error, dict) and error:
        kind, message = esc(error.get("type") or ""), esc(error.get("message"))
        out.append(f"<h3>error</h3><p><b>{kind}</b>: {message}</p>")
        if error.get("traceback"):
            out.append(f"<pre>{esc(error['traceback'])}</pre>")
    if run.patch:
        cut = f" ({run.patch_cut} more bytes not shown)" if run.patch_cut else ""
        out.append(f"<h3>uncommitted changes (code.patch){esc(cut)}</h3>{diff_pre(run.patch)}")
    attempts = [a for a in rec.get("attempts") or [] if isinstance(a, dict)]
    if len(attempts) > 1:
        rows = []
        for i, a in enumerate(attempts, 1):
            resumed = a.get("resumed_from")
            step = resumed.get("step") if isinstance(resumed, dict) else None
            argv = a.get("argv")
            line = shlex.join(map(str, argv)) if isinstance(argv, list) else fmt(argv)
            rows.append(
                [i, when(a.get("started")), a.get("host"), step, Raw(f"<code>{esc(line)}</code>")]
            )
        out.append(
            "<h3>attempts</h3>" + table(rows, ["#", "started", "host", "resumed from step", "argv"])
        )
    tables = []
    for section in ("config", "settings", "seeds", "versions", "host"):
        value = rec.get(section)
        if value:
            tables.append(f"<div><h3>{section}</h3>" + kv(flatten(value).items()) + "</div>")
    out.append('<div class="grid2">' + "".join(tables) + "</div>")
    packages = rec.get("packages") or {}
    if isinstance(packages, dict) and packages:
        out.append(
            f"<details><summary>packages ({len(packages)})</summary>"
            + table(
                sorted(([k, v] for k, v in packages.items()), key=lambda r: str(r[0])),
                ["package", "version"],
            )
            + "</details>"
        )
    return "".join(out)


def compression(run: RunData) -> str:
    """``stoker compress``'s size / latency / accuracy table of this run's model, and accuracy
    against batch-1 latency as a chart (one dot per form: up and to the left is better)."""
    rows = run.compression
    if not rows:
        return (
            "<p>No compression measured for this run (<code>stoker compress RUN</code> adds "
            "its table here).</p>"
        )
    batches = sorted({b for r in rows for b in r["latency_ms"]})
    header = ["form", "measured in", "file MB", "nonzero params", "accuracy", "perplexity"]
    header += [f"latency ms (batch {b})" for b in batches] + ["tokens/s"]
    body = []
    for r in rows:
        latencies = [r["latency_ms"].get(b, math.nan) for b in batches]
        nonzero = r["nonzero_params"] / 1e6
        accuracy = 100 * r["accuracy"]
        body.append(
            [r["name"], r["source"], _f(r["file_mb"], 2), _f(nonzero, 2, "M"), _f(accuracy, 1, "%")]
            + [_f(r["perplexity"], 2)]
            + [_f(v, 2) for v in latencies]
            + [_f(r["tokens_per_second"], 0)]
        )
    out = [table(body, header, cls="compression")]
    first = batches[0] if batches else None
    series = [
        Series(
            name=r["name"],
            xs=np.array([r["latency_ms"].get(first, math.nan)]),
            ys=np.array([100 * r["accuracy"]]),
            colour=PALETTE[i % len(PALETTE)],
            dots=True,
        )
        for i, r in enumerate(rows)
    ]
    if first is not None:
        title = f"accuracy (%) against latency at batch {first} (ms), one dot per form"
        legend = "".join(
            f'<span><i style="background:{s.colour}"></i>{esc(s.name)}</span>' for s in series
        )
        out.append(f'<p class="legend">{legend}</p>')
        out.append(line_chart(series, title=title, x_label=f"latency at batch {first} (ms)"))
    return "".join(out)


def _f(value: float, digits: int, suffix: str = "") -> str:
    return f"{value:,.{digits}f}{suffix}" if math.isfinite(value) else "-"
