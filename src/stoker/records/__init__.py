"""Every run recorded: what produced it, what it logged, how it ended; list, diff, reproduce.

- :func:`start_run` -> :class:`Run`: the run directory (``./runs/<UTC time>-<name>/``) with
  ``record.json`` (command, config, seeds, git revision + ``code.patch``, packages, versions,
  hardware, status), ``metrics.jsonl`` (:meth:`Run.log`, no host sync) and ``console.log``.
- :class:`MetricsLogger`: the metrics writer on its own.
- :func:`list_runs`, :func:`find_run`, :func:`effective_status`: read runs back (a SIGKILLed
  run shows as killed).
- :class:`TensorBoardTracker`, :class:`MLflowTracker`: trackers fed from the metrics writer's
  thread (``Stoker(trackers=[...])``), see :mod:`stoker.records.trackers`.
- :func:`diff_runs`: config, code and package differences of two runs.
- :func:`reproduce`: re-run a run at its recorded code in a temporary git worktree and
  compare the metrics.
"""

from stoker.records.diff import RunDiff, diff_runs
from stoker.records.listing import RunInfo, effective_status, find_run, list_runs
from stoker.records.metrics import MACHINE_METRICS, MetricsLogger, read_metrics
from stoker.records.record import read_record
from stoker.records.reproduce import ReproduceResult, compare_metrics, reproduce
from stoker.records.run import RecordConfig, Run, start_run
from stoker.records.rundir import RUN_DIR_ENV, RUNS_DIR_ENV, resolve_run_dir
from stoker.records.trackers import TRACKERS, MLflowTracker, TensorBoardTracker, Tracker

__all__ = [
    "MACHINE_METRICS",
    "RUNS_DIR_ENV",
    "RUN_DIR_ENV",
    "TRACKERS",
    "MLflowTracker",
    "MetricsLogger",
    "RecordConfig",
    "ReproduceResult",
    "Run",
    "RunDiff",
    "RunInfo",
    "TensorBoardTracker",
    "Tracker",
    "compare_metrics",
    "diff_runs",
    "effective_status",
    "find_run",
    "list_runs",
    "read_metrics",
    "read_record",
    "reproduce",
    "resolve_run_dir",
    "start_run",
]
