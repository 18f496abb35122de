"""The page's building blocks: escaping, tables, diffs, the stylesheet and the policy.

Everything from a run is untrusted text: it reaches the page only through :func:`esc` (or a
table cell, which escapes), never as markup. :data:`CSP` forbids scripts and every fetch, so
an escaping slip still could not run code or call out.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Iterable, Sequence
from html import escape
from typing import Any

__all__ = [
    "CSP",
    "CSS",
    "Raw",
    "diff_pre",
    "duration",
    "esc",
    "fmt",
    "json_text",
    "kv",
    "table",
    "when",
]

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
CSS = """
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
.status-running{color:#0366d6}.status-preempted{color:#b08800}
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


def esc(value: Any) -> str:
    """Escaped text of anything from a run (quotes too: safe inside attributes)."""
    return escape(value if isinstance(value, str) else str(value), quote=True)


def json_text(value: Any) -> str:
    return json.dumps(value, default=str, ensure_ascii=False)


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    return "-" if value is None else str(value)


def duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    s = round(seconds)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def when(text: Any) -> str:
    if not isinstance(text, str):
        return "-"
    try:
        return _dt.datetime.fromisoformat(text).strftime("%Y-%m-%d %H:%M:%S %Z").strip()
    except ValueError:
        return text


def table(rows: Iterable[Sequence[Any]], header: Sequence[str] = (), cls: str = "") -> str:
    out = [f'<table class="{cls}">' if cls else "<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
    for row in rows:
        out.append("<tr>" + "".join(_cell(c) for c in row) + "</tr>")
    out.append("</table>")
    return "".join(out)


class Raw(str):
    """Markup built here (already escaped), put into a table cell as is."""


def _cell(value: Any) -> str:
    if isinstance(value, Raw):
        return f"<td>{value}</td>"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f'<td class="num">{esc(fmt(value))}</td>'
    return f"<td>{esc(fmt(value))}</td>"


def diff_pre(text: str) -> str:
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
        lines.append(f'<span class="{cls}">{esc(line)}</span>' if cls else esc(line))
    return '<pre class="diff">' + "\n".join(lines) + "</pre>"


def kv(pairs: Iterable[tuple[str, Any]]) -> str:
    return table(
        (
            [k, Raw(f"<code>{esc(v if isinstance(v, str) else json_text(v))}</code>")]
            for k, v in pairs
        ),
        ["key", "value"],
    )
