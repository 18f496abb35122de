"""The doctor: profile a window of a training run and say what to change, with your line.

Two ways in:

- ``stoker doctor script.py [args]`` (or :func:`diagnose_script`) on any plain PyTorch script;
- ``Doctor(config).attach()`` inside a run, with one cheap ``doctor.step()`` per optimizer step
  when the caller counts steps itself (``attach(auto_step=False)``), then ``doctor.report()``.
"""

from stoker.doctor.config import DoctorConfig
from stoker.doctor.measurements import Measurements
from stoker.doctor.report import Report
from stoker.doctor.rules import RULES, Finding, diagnose
from stoker.doctor.script import diagnose_script
from stoker.doctor.session import Doctor, active_doctor

__all__ = [
    "RULES",
    "Doctor",
    "DoctorConfig",
    "Finding",
    "Measurements",
    "Report",
    "active_doctor",
    "diagnose",
    "diagnose_script",
]
