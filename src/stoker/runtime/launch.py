"""Launching a training script on one or many processes through torchrun's elastic agent.

``stoker run`` adds no launcher of its own: it validates the request, then hands it to
``torch.distributed.run`` (the module behind ``torchrun``), whose c10d rendezvous also joins
several machines and whose agent restarts failed workers (``--max-restarts``). Each worker runs
the script through :mod:`stoker.runtime.entry`, which turns a :class:`~stoker.StokerError` into
one line instead of a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from stoker.errors import StokerError

__all__ = ["LaunchConfig", "WorkerFailed", "launch", "torchrun_argv"]


@dataclass(frozen=True, slots=True, kw_only=True)
class LaunchConfig:
    """What ``stoker run`` was asked to start."""

    script: str
    """Path of the user's training script."""
    script_args: list[str] = field(default_factory=list)
    """Arguments passed through to the script untouched."""
    nproc: int = 1
    """Worker processes on this machine."""
    nnodes: str = "1"
    """Number of machines, or a ``MIN:MAX`` range for elastic jobs."""
    node_rank: int | None = None
    """This machine's rank for static rendezvous; None lets c10d assign it."""
    rdzv_endpoint: str | None = None
    """``host:port`` of the rendezvous (required with more than one node)."""
    rdzv_id: str = "stoker"
    """Job id shared by all nodes of one job."""
    max_restarts: int = 0
    """How many times the agent restarts the worker group after a failure."""

    def __post_init__(self) -> None:
        if self.nproc < 1:
            raise StokerError(
                f"--nproc {self.nproc} is not a number of processes; use 1 or more "
                "(one per GPU, or 1-2 on a CPU machine)"
            )
        if self.max_restarts < 0:
            raise StokerError(f"--max-restarts {self.max_restarts} must be 0 or more")
        path = Path(self.script)
        if not path.is_file():
            where = "is a directory" if path.is_dir() else "does not exist"
            raise StokerError(
                f"training script {self.script!r} {where} (cwd {Path.cwd()}); "
                "give the path of a Python file, e.g. `stoker run examples/train_mlm.py`"
            )
        if self.nnodes != "1" and not self.rdzv_endpoint:
            raise StokerError(
                f"--nnodes {self.nnodes} needs --rdzv HOST:PORT, the address every node can "
                "reach (e.g. the first node's hostname and a free port such as 29500)"
            )


def torchrun_argv(config: LaunchConfig) -> list[str]:
    """The ``torchrun`` command line equivalent to ``config`` (without the program name)."""
    argv = ["--nproc-per-node", str(config.nproc), "--max-restarts", str(config.max_restarts)]
    if config.nnodes == "1" and not config.rdzv_endpoint:
        argv.append("--standalone")
    else:
        argv += ["--nnodes", config.nnodes, "--rdzv-backend", "c10d"]
        argv += ["--rdzv-endpoint", str(config.rdzv_endpoint), "--rdzv-id", config.rdzv_id]
        if config.node_rank is not None:
            argv += ["--node-rank", str(config.node_rank)]
    argv += ["--module", "stoker.runtime.entry", config.script, *config.script_args]
    return argv


def _stoker_run_argv(config: LaunchConfig) -> list[str]:
    argv = ["--nproc", str(config.nproc), "--max-restarts", str(config.max_restarts)]
    if config.nnodes != "1" or config.rdzv_endpoint:
        argv += ["--nnodes", config.nnodes, "--rdzv", str(config.rdzv_endpoint)]
        argv += ["--rdzv-id", config.rdzv_id]
    return [*argv, config.script, *config.script_args]


def _available_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def launch(config: LaunchConfig) -> int:
    """Run the job to completion; returns the exit code (0 when every worker succeeded)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from stoker.records import RUN_DIR_ENV, resolve_run_dir
    from stoker.records.run import LAUNCH_COMMAND_ENV

    argv = torchrun_argv(config)
    args = get_args_parser().parse_args(argv)
    # One run directory for every worker and every restart of this job: a restarted worker
    # finds the last good checkpoint there and resumes (Stoker's resume="auto").
    if RUN_DIR_ENV not in os.environ:
        os.environ[RUN_DIR_ENV] = str(resolve_run_dir(Path(config.script).stem))
    os.environ[LAUNCH_COMMAND_ENV] = json.dumps(
        [sys.executable, "-m", "stoker", "run", *_stoker_run_argv(config)]
    )
    if config.nproc > 1 and "OMP_NUM_THREADS" not in os.environ:
        # torchrun would set 1 thread per worker (and warn); share this machine's cores instead.
        # The workers inherit this process's environment.
        os.environ["OMP_NUM_THREADS"] = str(max(1, _available_cores() // config.nproc))
    # The agent logs each worker failure with a multi-line dump; the worker already printed
    # its own error, so keep the agent to one line per problem.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as exc:
        failures = exc.failures
        rank, first = min(failures.items())
        raise WorkerFailed(
            f"{len(failures)} worker(s) failed; first: rank {rank} exited with code "
            f"{first.exitcode} (its own message is above)",
            exitcode=first.exitcode if first.exitcode > 0 else 1,
        ) from None
    return 0


class WorkerFailed(StokerError):
    def __init__(self, message: str, *, exitcode: int) -> None:
        super().__init__(message)
        self.exitcode = exitcode
