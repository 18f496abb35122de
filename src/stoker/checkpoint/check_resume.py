"""``stoker check-resume``: does killing and resuming your script change its result?

It runs the script twice in fresh run directories:

1. *uninterrupted*, to the end;
2. *interrupted*: started with ``STOKER_FAULT_KILL_AT_STEP=k`` so the process SIGKILLs itself
   at step k (before that step's checkpoint), restarted, killed again at the next random step
   if ``kills > 1``, and finally run to the end;

then compares the final checkpoints tensor by tensor, bitwise, and the per-step losses of
``metrics.jsonl`` when both runs wrote one (the first differing step says which resume broke).

The contract with the script (stoker's runtime does all of this; a hand-written loop uses
:class:`~stoker.checkpoint.Checkpointer`): it takes its run directory from ``$STOKER_RUN_DIR``,
writes checkpoints to ``$STOKER_RUN_DIR/checkpoints`` calling ``maybe_save(step, ...)`` after
every step, resumes from the newest valid one, and saves a final checkpoint at its last step.
Bitwise equality also needs deterministic kernels (``torch.use_deterministic_algorithms``) and
the same number of threads in both runs.
"""

from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stoker.checkpoint.checkpointer import KILL_AT_STEP_ENV
from stoker.checkpoint.manifest import read_manifest
from stoker.checkpoint.resume import latest_valid
from stoker.checkpoint.state import read_json, read_tensors
from stoker.errors import StokerError

__all__ = ["CheckResumeConfig", "CheckResumeResult", "check_resume", "compare_checkpoints"]

RUN_DIR_ENV = "STOKER_RUN_DIR"


@dataclass(frozen=True, kw_only=True, slots=True)
class CheckResumeConfig:
    """How to exercise the script."""

    kills: int = 1
    """SIGKILLs during the interrupted run, at distinct random steps in increasing order."""
    seed: int | None = None
    """Seed for choosing the kill steps (None: a fresh random choice, printed)."""
    nproc: int = 1
    """Processes per run; > 1 launches through ``torch.distributed.run`` (DDP)."""
    timeout_s: float = 3600.0
    """Give up on one launch of the script after this many seconds."""
    workdir: Path | None = None
    """Where the two run directories go (default: a new temporary directory, kept)."""

    def __post_init__(self) -> None:
        if self.kills < 1:
            raise StokerError(f"kills={self.kills}; check-resume needs at least one kill")
        if self.nproc < 1:
            raise StokerError(f"nproc={self.nproc}; use 1 or more processes")
        if not 0 < self.timeout_s < math.inf:
            raise StokerError(f"timeout_s={self.timeout_s}; use a positive number of seconds")


@dataclass(slots=True)
class CheckResumeResult:
    identical: bool
    """Every tensor and value of the final checkpoints is bitwise equal."""
    final_step: int
    kill_steps: list[int]
    tensors_compared: int
    differences: list[str] = field(default_factory=list)
    first_loss_difference: int | None = None
    """First step whose logged loss differs between the runs (None: none, or no metrics)."""
    reference_dir: Path | None = None
    resumed_dir: Path | None = None


def _command(script: str, args: Sequence[str], nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, script, *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        script,
        *args,
    ]


def _launch(
    cmd: list[str], run_dir: Path, timeout: float, kill_at: int | None
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env[RUN_DIR_ENV] = str(run_dir)
    env.pop(KILL_AT_STEP_ENV, None)
    if kill_at is not None:
        env[KILL_AT_STEP_ENV] = str(kill_at)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        return subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise StokerError(
            f"`{' '.join(cmd)}` ran longer than {timeout:.0f} s; raise --timeout"
        ) from None


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from metrics.jsonl; a step logged twice (replayed after a resume) keeps
    its last value. Truncated last lines (a killed writer) are ignored."""
    from stoker.records.metrics import read_metrics

    out: dict[int, float] = {}
    for rec in read_metrics(run_dir / "metrics.jsonl"):  # a regular file, or nothing
        step, loss = rec.get("step"), rec.get("loss")
        if isinstance(step, int) and isinstance(loss, int | float):
            out[step] = float(loss)
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _bits(t: torch.Tensor) -> torch.Tensor:
    # Compare bytes, not values: NaN == NaN and -0.0 != 0.0, as "bitwise" promises.
    return t.reshape(-1).view(torch.uint8)


def compare_checkpoints(a: Path, b: Path) -> tuple[int, list[str]]:
    """``(tensors compared, differences)`` between two checkpoints, bitwise."""
    ma, mb = read_manifest(a), read_manifest(b)
    diffs: list[str] = []
    if ma.step != mb.step:
        diffs.append(f"steps differ: {ma.step} vs {mb.step}")
    names = sorted(set(ma.files) | set(mb.files))
    compared = 0
    for name in names:
        if name not in ma.files or name not in mb.files:
            diffs.append(f"{name}: only in {'the first' if name in ma.files else 'the second'}")
            continue
        if ma.files[name].kind == "json":
            if not _same(read_json(a / name), read_json(b / name)):
                diffs.append(f"{name}: values differ")
            continue
        ta, tb = read_tensors(a / name), read_tensors(b / name)
        for key in sorted(set(ta) | set(tb)):
            if key not in ta or key not in tb:
                diffs.append(f"{name}:{key}: missing in one checkpoint")
                continue
            x, y = ta[key], tb[key]
            compared += 1
            if x.dtype != y.dtype or x.shape != y.shape:
                diffs.append(f"{name}:{key}: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}")
            elif not torch.equal(_bits(x), _bits(y)):
                detail = ""
                if x.is_floating_point():
                    detail = f" (max abs diff {(x.double() - y.double()).abs().max().item():.3g})"
                diffs.append(f"{name}:{key}: values differ{detail}")
    return compared, diffs


def check_resume(
    script: str,
    script_args: Sequence[str] = (),
    config: CheckResumeConfig | None = None,
    *,
    echo: Callable[[str], None] = print,
) -> CheckResumeResult:
    """Run ``script`` uninterrupted and killed/resumed; compare the final checkpoints."""
    config = config or CheckResumeConfig()
    if not Path(script).is_file():
        what = "is a directory" if Path(script).is_dir() else "does not exist"
        raise StokerError(f"script {script!r} {what} (cwd {Path.cwd()}); give its path")
    workdir = config.workdir or Path(tempfile.mkdtemp(prefix="stoker-check-resume-"))
    ref_dir, res_dir = workdir / "uninterrupted", workdir / "resumed"
    for run_dir in (ref_dir, res_dir):  # before any run: not after the first one's minutes
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StokerError(
                f"cannot use {workdir} as the work directory: {exc.strerror or exc} "
                f"({exc.filename}); pass --workdir a writable directory"
            ) from None
    cmd = _command(script, script_args, config.nproc)

    echo(f"1/3 uninterrupted run -> {ref_dir}")
    t0 = time.monotonic()
    done = _launch(cmd, ref_dir, config.timeout_s, None)
    if done.returncode != 0:
        raise StokerError(
            f"the uninterrupted run failed with exit code {done.returncode}; fix the script "
            f"first. Its last output:\n{_tail(done.stderr or done.stdout)}"
        )
    final = latest_valid(ref_dir / "checkpoints")
    if final is None:
        raise StokerError(
            f"the script wrote no checkpoint under ${RUN_DIR_ENV}/checkpoints ({ref_dir}); it must "
            "use a Checkpointer there (see `stoker check-resume --help`)"
        )
    final_step = read_manifest(final).step
    if final_step is None or final_step < 2:
        raise StokerError(f"the final checkpoint {final} is at step {final_step}; need >= 2 steps")
    echo(f"    finished at step {final_step} in {time.monotonic() - t0:.1f} s")

    seed = config.seed if config.seed is not None else random.SystemRandom().randrange(2**31)
    n_kills = min(config.kills, final_step - 1)
    kills = sorted(random.Random(seed).sample(range(1, final_step), n_kills))
    echo(f"2/3 interrupted run -> {res_dir}: SIGKILL at steps {kills} (seed {seed})")
    for k in kills:
        done = _launch(cmd, res_dir, config.timeout_s, k)
        killed = done.returncode == -signal.SIGKILL or (config.nproc > 1 and done.returncode != 0)
        if not killed:
            raise StokerError(
                f"the run meant to die at step {k} exited with code {done.returncode} instead; "
                "does it take steps (a stoker loop: stoker.backward() with a prepared optimizer, "
                "or stoker.step_done() after a hand-written update; a plain one: "
                "Checkpointer.maybe_save(step, ...) every step)? "
                f"Its last output:\n{_tail(done.stderr or done.stdout)}"
            )
        newest = latest_valid(res_dir / "checkpoints")
        since = f"resumes from {newest.name}" if newest else "no checkpoint yet: restarts from 0"
        echo(f"    killed at step {k}; {since}")
    done = _launch(cmd, res_dir, config.timeout_s, None)
    if done.returncode != 0:
        raise StokerError(
            f"the resumed run failed with exit code {done.returncode}. "
            f"Its last output:\n{_tail(done.stderr or done.stdout)}"
        )
    resumed_final = latest_valid(res_dir / "checkpoints")
    if resumed_final is None:
        raise StokerError(f"the resumed run left no valid checkpoint under {res_dir}")

    echo("3/3 comparing final checkpoints bitwise")
    compared, diffs = compare_checkpoints(final, resumed_final)
    ref_loss, res_loss = _losses(ref_dir), _losses(res_dir)
    first = None
    for step in sorted(set(ref_loss) & set(res_loss)):
        if ref_loss[step] != res_loss[step]:
            first = step
            break
    return CheckResumeResult(
        identical=not diffs,
        final_step=final_step,
        kill_steps=kills,
        tensors_compared=compared,
        differences=diffs,
        first_loss_difference=first,
        reference_dir=ref_dir,
        resumed_dir=res_dir,
    )
