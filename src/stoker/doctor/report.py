"""The doctor's report: a rich terminal view (most costly finding first) and ``doctor.json``."""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from stoker.doctor.measurements import Measurements
from stoker.doctor.probes import Probe
from stoker.doctor.rules import Finding
from stoker.runtime.hardware import matmul_speed

__all__ = ["Report"]

_PHASES = (
    ("data", "waiting for data"),
    ("forward", "forward"),
    ("backward", "backward"),
    ("optimizer", "optimizer"),
    ("host_sync", "host-sync stalls"),
    ("other", "other / idle"),
)
_COLORS = {"high": "bold red", "medium": "yellow", "low": "cyan"}


@dataclass(slots=True)
class Report:
    """Findings plus the numbers they came from; JSON-serialisable via :meth:`as_dict`."""

    findings: list[Finding]
    summary: dict[str, Any]
    probes: dict[str, dict[str, float | str]] = field(default_factory=dict)

    @classmethod
    def build(cls, m: Measurements, probes: dict[str, Probe], findings: list[Finding]) -> Report:
        prof = m.profile
        summary = {
            "device": m.device,
            "profiled_steps": m.steps,
            "step_ms": round(m.step_ms, 3),
            "unprofiled_step_ms": (
                round(m.baseline_step_ms, 3) if m.baseline_step_ms is not None else None
            ),
            "phases_ms": {k: round(v, 3) for k, v in m.phases_ms.items()},
            "device_idle_fraction": round(
                max(
                    0.0,
                    1
                    - (prof.device_busy_ms if prof.device_busy_ms is not None else prof.busy_ms)
                    / m.step_ms,
                ),
                3,
            ),
            "ops_per_step": round(prof.ops_per_step, 1),
            "matmul_ms_by_dtype": {k: round(v, 3) for k, v in prof.matmul_ms_by_dtype.items()},
            "top_ops": [
                {"op": n, "ms_per_step": round(t, 3), "calls_per_step": c}
                for n, t, c in prof.top_ops
            ],
            "optimizer_step_at": str(m.loop_site) if m.loop_site is not None else None,
            "intra_op_threads": m.threads["intra_op"],
            "cores": m.threads["cores"],
            "hardware_favours": matmul_speed(m.device).describe(),
        }
        accounting = m.extras.get("accounting")
        if accounting:
            summary["padding_fraction"] = round(accounting["padding_fraction"], 4)
            summary["rank_wait_fraction"] = round(accounting["wait_fraction"], 4)
        probe_dict: dict[str, dict[str, float | str]] = {
            name: {
                "baseline_ms": round(1e3 * p.baseline_s, 3),
                "variant_ms": round(1e3 * p.variant_s, 3),
                "ratio": round(p.ratio, 3),
                "what": p.detail,
            }
            for name, p in probes.items()
        }
        return cls(findings=findings, summary=summary, probes=probe_dict)

    @property
    def codes(self) -> list[str]:
        """Finding codes, most costly first."""
        return [f.code for f in self.findings]

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "summary": self.summary,
            "findings": [f.as_dict() for f in self.findings],
            "probes": self.probes,
        }

    def write_json(self, path: str | os.PathLike[str]) -> str:
        """Write ``doctor.json`` (``path`` may be a directory); returns the file written."""
        target = os.fspath(path)
        if os.path.isdir(target):
            target = os.path.join(target, "doctor.json")
        tmp = target + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(self.as_dict(), fh, indent=2, default=str)
            fh.write("\n")
        os.replace(tmp, target)
        return target

    def print(self, console: Console | None = None) -> None:
        """Print the report to the terminal (rich)."""
        console = console or Console()
        s = self.summary
        step = s["step_ms"]
        head = f"[bold]stoker doctor[/] — {s['profiled_steps']} profiled steps on {s['device']}"
        head += f", {step:.1f} ms per step"
        if s["unprofiled_step_ms"] is not None:
            head += f" ({s['unprofiled_step_ms']:.1f} ms unprofiled)"
        console.print(head)
        if s.get("hardware_favours"):
            console.print(f"this hardware favours {s['hardware_favours']}", highlight=False)
        table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
        table.add_column("where the step goes")
        table.add_column("ms", justify="right")
        table.add_column("share", justify="right")
        for key, label in _PHASES:
            ms = s["phases_ms"].get(key, 0.0)
            table.add_row(label, f"{ms:.2f}", f"{100 * ms / step:.0f}%" if step else "-")
        console.print(table)
        console.print(
            f"device idle {100 * s['device_idle_fraction']:.0f}% of the step, "
            f"{s['ops_per_step']:.0f} ops per step, {s['intra_op_threads']} intra-op thread(s) on "
            f"{s['cores']} cores"
        )
        if not self.findings:
            console.print("[green]No findings: nothing in this loop is worth changing.[/]")
            return
        for i, f in enumerate(self.findings, 1):
            cost = f"~{100 * f.share:.0f}% of step" if f.share is not None else "unmeasured"
            # Finding texts are code (`x[idx]`, `[seq, batch]`): printed verbatim, not as markup.
            where = f" at [bold]{escape(f.location)}[/]" if f.location else ""
            console.print(
                f"\n{i}. [{_COLORS.get(f.severity, '')}]{f.code}[/] ({f.severity}, {cost}){where}"
            )
            console.print(f"   {escape(f.title)}", highlight=False)
            console.print(f"   [bold]fix:[/] {escape(f.fix)}", highlight=False)

    def render_text(self, width: int = 100) -> str:
        """The terminal report as plain text."""
        buf = io.StringIO()
        self.print(Console(file=buf, width=width, color_system=None, force_terminal=False))
        return buf.getvalue()
