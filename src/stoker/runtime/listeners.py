"""The step listeners a :class:`~stoker.Stoker` attaches besides checkpoints (which are
:class:`~stoker.runtime.services.RunServices`): the doctor, the ranks' final barrier and the
run record. See :class:`~stoker.runtime.step.StepListener` for when each call comes.

Attached in this order, so closed in the reverse one when the run ends::

    RecordListener   record.json says finished / failed / killed / preempted  (closes last)
    RanksListener    ranks leave together (not after a failure; after a preemption too)
    PreemptionListener  signal -> checkpoint -> exit 143 (runtime/preemption.py)
    DoctorListener   the doctor's report (not after a failure)
    StepMeters       the meters' summary into record.json (stoker.meters.live)
    RunServices      the final checkpoint (not after a failure)      (closes first)
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from stoker.errors import Preempted, StokerError
from stoker.runtime.distributed import wait_for_ranks
from stoker.runtime.step import StepListener

if TYPE_CHECKING:
    from stoker.doctor import Doctor
    from stoker.runtime.services import RunServices

__all__ = ["DoctorListener", "RanksListener", "RecordListener"]

log = logging.getLogger(__name__)

REPORT_ENV = "STOKER_REPORT"


class DoctorListener(StepListener):
    """Counts the doctor's steps until its window is over (then detaches it: no hook stays on
    the training path); prints and writes its report when the run ends well."""

    def __init__(self, doctor: Doctor, run_dir: Path | None) -> None:
        self.doctor = doctor
        self.run_dir = run_dir
        self.active = True

    def on_step_end(self, step: int) -> int | None:
        if not self.active:
            return sys.maxsize
        doctor = self.doctor
        doctor.step()
        if doctor.done or doctor.failed is not None:
            doctor.detach()
            self.active = False
            return sys.maxsize  # nothing to count any more
        return None

    def close(self, failed: BaseException | None) -> None:
        doctor = self.doctor
        doctor.detach()  # a failed run has nothing to diagnose, but the profiler must stop
        if failed is not None:
            return
        try:
            report = doctor.report()
        except StokerError as exc:
            log.info("stoker doctor: no report: %s", exc)
            return
        report.print()
        if self.run_dir is not None:
            report.write_json(self.run_dir)


class RanksListener(StepListener):
    """Ranks leave together: a rank exiting while another still talks to it would abort that
    one. A failed rank leaves at once (its peers fail in turn, and torchrun restarts the job);
    the others wait for each other for at most ``$STOKER_COLLECTIVE_TIMEOUT``."""

    def __init__(self, group: Any) -> None:
        self.group = group

    def close(self, failed: BaseException | None) -> None:
        # A preempted run (all ranks stopped at one step, checkpoint written) is not a failure.
        if (failed is None or isinstance(failed, Preempted)) and dist.is_initialized():
            wait_for_ranks(self.group, "the end of the run (Stoker.close)")


class RecordListener(StepListener):
    """Closes the run record: ``finished``, or ``failed`` / ``killed`` with the error; then
    writes the run's HTML report (``report.html`` in the run directory) and prints its path.
    ``$STOKER_REPORT=0`` skips the report (the test suite does: hundreds of tiny runs)."""

    def __init__(self, services: RunServices) -> None:
        self.services = services

    def close(self, failed: BaseException | None) -> None:
        self.services.finish(failed)
        run = self.services.run
        if run is None or not run.enabled or os.environ.get(REPORT_ENV, "1") == "0":
            return
        from stoker.report import write_report

        try:
            path = write_report(run.dir)
        except Exception as exc:  # the report must never turn a finished run into a failed one
            print(f"stoker: warning: no HTML report for {run.dir}: {exc}", file=sys.stderr)
            return
        print(f"stoker: report: {path}", file=sys.stderr)
