"""``stoker reproduce ID``: run a recorded run again, from its own code, and compare metrics.

1. ``git worktree add --detach`` a temporary checkout of the recorded revision (the user's
   working tree, index and branches are untouched) and ``git apply`` the run's ``code.patch``,
   so the checkout holds exactly the code the run saw, untracked files included;
2. re-run the recorded command there: the ``stoker run`` command line when the run was
   launched by it, else the same interpreter flags, script and arguments (through
   ``torch.distributed.run`` if the run had several processes), from the same relative
   working directory, with absolute paths into the repository mapped into the checkout and
   the checkout first on ``PYTHONPATH`` (its ``src/`` too, if any);
3. the new run records itself into ``<run>/reproductions/<UTC time>/``; compare its
   ``metrics.jsonl`` with the original's: the final value of every metric both logged, and
   the largest difference over the steps both logged (not the meters' speed and memory,
   ``MACHINE_METRICS``: those differ between any two runs).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stoker.errors import StokerError
from stoker.records import git as _git
from stoker.records.metrics import MACHINE_METRICS, read_metrics
from stoker.records.record import METRICS, PATCH, read_record
from stoker.records.rundir import RUN_DIR_ENV, new_run_id

__all__ = ["MetricDiff", "ReproduceResult", "compare_metrics", "reproduce"]


@dataclass(frozen=True, slots=True)
class MetricDiff:
    key: str
    original: float | None
    """Final value in the original run (at its last step logging this metric)."""
    reproduced: float | None
    max_abs_diff: float
    """Largest |original - reproduced| over the steps both runs logged (inf if none shared)."""
    steps_compared: int


@dataclass(slots=True)
class ReproduceResult:
    original: Path
    reproduction: Path
    returncode: int
    metrics: list[MetricDiff] = field(default_factory=list)
    tolerance: float = 0.0

    @property
    def matches(self) -> bool:
        """The command succeeded and every shared metric agrees within the tolerance."""
        return (
            self.returncode == 0
            and bool(self.metrics)
            and all(m.max_abs_diff <= self.tolerance for m in self.metrics)
        )


def _series(path: Path) -> dict[str, dict[int, float]]:
    """metric -> step -> value; a step logged twice (replayed after a resume) keeps the last."""
    out: dict[str, dict[int, float]] = {}
    for rec in read_metrics(path):
        step = rec.get("step")
        if not isinstance(step, int):
            continue
        for key, value in rec.items():
            if key in ("step", "time") or key in MACHINE_METRICS or isinstance(value, bool):
                continue
            if isinstance(value, int | float):
                out.setdefault(key, {})[step] = float(value)
    return out


def compare_metrics(original: Path, reproduced: Path) -> list[MetricDiff]:
    """Per-metric comparison of two ``metrics.jsonl`` files (see the module docstring)."""
    a, b = _series(original), _series(reproduced)
    diffs = []
    for key in sorted(set(a) & set(b)):
        shared = sorted(set(a[key]) & set(b[key]))
        if shared:
            worst = max(
                0.0
                if (math.isnan(a[key][s]) and math.isnan(b[key][s]))
                else abs(a[key][s] - b[key][s])
                for s in shared
            )
        else:
            worst = math.inf
        diffs.append(
            MetricDiff(
                key=key,
                original=a[key][max(a[key])],
                reproduced=b[key][max(b[key])],
                max_abs_diff=worst,
                steps_compared=len(shared),
            )
        )
    return diffs


def _map_path(arg: str, repo: Path, worktree: Path) -> str:
    p = Path(arg)
    if p.is_absolute():
        try:
            return str(worktree / p.relative_to(repo))
        except ValueError:
            return arg
    return arg


def _command(record: dict[str, Any], repo: Path, worktree: Path) -> list[str]:
    command = record.get("command") or {}
    launcher = command.get("launcher")
    if launcher:
        try:
            argv = json.loads(launcher) if launcher.startswith("[") else launcher.split()
        except json.JSONDecodeError:
            argv = None
        if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
            raise StokerError(
                f"the run record's command.launcher {launcher[:80]!r} is not a command line; "
                "it cannot be re-run"
            )
        return [_map_path(a, repo, worktree) for a in argv]
    orig = list(command.get("orig_argv") or [])
    argv = list(command.get("argv") or [])
    if not argv:
        raise StokerError("the run record has no command line; it cannot be re-run")
    # orig_argv = [python, *interpreter flags, script, *args]; keep the flags.
    flags = orig[1 : len(orig) - len(argv)] if len(orig) > len(argv) else []
    mapped = [_map_path(a, repo, worktree) for a in argv]
    world = int(record.get("world_size") or 1)
    if world > 1:
        dist = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world)]
        return [sys.executable, *dist, *mapped]
    return [sys.executable, *flags, *mapped]


def reproduce(
    run_dir: Path,
    *,
    tolerance: float = 0.0,
    keep_worktree: bool = False,
    timeout_s: float | None = None,
    quiet: bool = False,
    echo: Callable[[str], None] = print,
) -> ReproduceResult:
    """Re-run the run in ``run_dir`` at its recorded code; see the module docstring."""
    run_dir = Path(run_dir).resolve()
    record = read_record(run_dir)
    git_info = record.get("git")
    if not git_info:
        raise StokerError(
            f"run {run_dir.name} was not started inside a git repository, so its code cannot be "
            "checked out again; run it from a git repository to make it reproducible"
        )
    revision = git_info.get("revision")
    if not revision:
        raise StokerError(
            f"run {run_dir.name} was recorded in a repository without any commit; commit once "
            "so runs have a revision to return to"
        )
    repo = Path(git_info.get("repo") or "")
    if not git_info.get("repo") or not repo.is_dir():
        raise StokerError(f"the run's repository {repo} does not exist on this machine")
    try:
        _git.git(repo, "cat-file", "-e", f"{revision}^{{commit}}")
    except _git.GitError:
        raise StokerError(
            f"revision {revision[:12]} of run {run_dir.name} is not in {repo} (rebased away, or "
            "not fetched); fetch it and try again"
        ) from None

    tmp = Path(tempfile.mkdtemp(prefix="stoker-reproduce-"))
    worktree = tmp / "code"
    out_dir = run_dir / "reproductions" / new_run_id(record.get("name") or "run")
    echo(f"checking out {revision[:12]} into {worktree}")
    try:
        _git.git(repo, "worktree", "add", "--detach", str(worktree), revision)
    except _git.GitError as exc:
        raise StokerError(f"could not create a git worktree of {repo}: {exc}") from None
    try:
        if git_info.get("patch"):
            untracked = len(git_info.get("untracked_included") or [])
            echo(f"applying {PATCH} ({untracked} untracked files)")
            try:
                _git.git(worktree, "apply", "--binary", "--whitespace=nowarn", str(run_dir / PATCH))
            except _git.GitError as exc:
                raise StokerError(
                    f"the run's {PATCH} does not apply to revision {revision[:12]} ({exc}); "
                    "was the file edited?"
                ) from None
        command = _command(record, repo, worktree)
        cwd = Path((record.get("command") or {}).get("cwd") or repo)
        if cwd.is_relative_to(repo):  # else the run started outside its repo: keep its cwd
            cwd = worktree / cwd.relative_to(repo)
        env = dict(os.environ)
        env[RUN_DIR_ENV] = str(out_dir)
        paths = [str(worktree)] + ([str(worktree / "src")] if (worktree / "src").is_dir() else [])
        env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [env.get("PYTHONPATH")] if p])
        out_dir.mkdir(parents=True, exist_ok=True)
        echo(f"running {' '.join(command)} (in {cwd}) -> {out_dir}")
        done = subprocess.run(
            command,
            cwd=cwd,
            env=env,
            timeout=timeout_s,
            check=False,
            capture_output=quiet,
        )
    finally:
        if not keep_worktree:
            _git.git(repo, "worktree", "remove", "--force", str(worktree), check=False)
            _git.git(repo, "worktree", "prune", check=False)
            shutil.rmtree(tmp, ignore_errors=True)
    return ReproduceResult(
        original=run_dir,
        reproduction=out_dir,
        returncode=done.returncode,
        metrics=compare_metrics(run_dir / METRICS, out_dir / METRICS),
        tolerance=tolerance,
    )
