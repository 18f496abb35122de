"""The Finding type, the rule registry and :func:`diagnose` (rules live in the sibling modules)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from stoker.doctor.frames import Site
from stoker.doctor.measurements import Measurements
from stoker.doctor.probes import Probe

__all__ = ["RULES", "SEVERITIES", "Finding", "diagnose"]

log = logging.getLogger(__name__)

SEVERITIES = ("high", "medium", "low")


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing to change: what, what it costs, where, and how."""

    code: str
    """Stable kebab-case identifier, e.g. ``"host-sync"``."""
    severity: str
    """``"high"`` (>= 20 % of step time), ``"medium"`` (>= 5 %) or ``"low"``."""
    share: float | None
    """Estimated fraction of step time the fix saves; None when it could not be measured."""
    title: str
    """What is wrong, in one line."""
    fix: str
    """The change to make, in code terms."""
    location: str | None = None
    """``file:line`` in the user's code."""
    evidence: dict[str, Any] = field(default_factory=dict)
    """The measured numbers behind the finding."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "severity": self.severity,
            "share": self.share,
            "title": self.title,
            "fix": self.fix,
            "location": self.location,
            "evidence": self.evidence,
        }


Probes = Mapping[str, Probe]
Rule = Callable[[Measurements, Probes], list[Finding]]
RULES: dict[str, Rule] = {}


def rule(code: str) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        RULES[code] = fn
        return fn

    return register


def severity_of(share: float | None, floor: str = "low") -> str:
    level = "low"
    if share is not None and share >= 0.20:
        level = "high"
    elif share is not None and share >= 0.05:
        level = "medium"
    return min(level, floor, key=SEVERITIES.index)


def location(site: Site | None) -> str | None:
    return str(site) if site is not None else None


def rounded_ms(x: float) -> float:
    return round(x, 3)


def diagnose(m: Measurements, probes: Probes) -> list[Finding]:
    """All findings, most costly first (unmeasured ones last). A failing rule is skipped."""
    findings: list[Finding] = []
    for code, check in RULES.items():
        try:
            findings.extend(check(m, probes))
        except Exception as exc:  # one broken rule must not cost the user the others
            log.warning("doctor rule %s failed: %r", code, exc)
    return sorted(findings, key=lambda f: -(f.share if f.share is not None else -1.0))
