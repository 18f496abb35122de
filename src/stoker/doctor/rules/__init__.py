"""Rules: one small function per finding code, from the measurements to what to change.

Every rule returns zero or more :class:`Finding`. A finding's ``share`` is the fraction of the
step time the doctor expects the fix to save, computed from numbers measured in this run: the
window's phase times, the attribution steps' per-line times and the probes (the fix timed on the
user's own model). A rule with nothing measured stays quiet: a clean loop gets no findings.

Registry: ``RULES`` maps each code to its function (``loop``, ``compute`` and ``data`` hold them,
by what they are about); :func:`diagnose` runs them all, most costly finding first.
"""

from stoker.doctor.rules import compute, data, loop  # noqa: F401  (registers the rules)
from stoker.doctor.rules._base import RULES, SEVERITIES, Finding, diagnose

__all__ = ["RULES", "SEVERITIES", "Finding", "diagnose"]
