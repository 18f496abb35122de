"""SIGKILL in the middle of checkpoint writes (sync and async), at random points: no checkpoint
ever verifies but holds the wrong state, and resume picks the newest good one (issue 13 item 4).

The job (save_kill_job.py) saves at every step, so nearly every kill lands inside a write:
the snapshot, the files, their fsync, the manifest, the rename or the pruning of old ones.
(test_exact_resume.py kills between saves, at a step; this kills inside them.)
"""

import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from stoker.checkpoint import Checkpointer, CheckpointError, list_checkpoints, load, verify

JOB = str(Path(__file__).with_name("save_kill_job.py"))


def _fresh_state() -> dict:
    model = nn.Sequential(nn.Linear(512, 1024), nn.Linear(1024, 512))
    return {"model": model, "progress": {"step": -1}}


def _is_state_of(state: dict, step: int) -> bool:
    for value in state["model"].state_dict().values():
        expected = torch.arange(value.numel(), dtype=value.dtype).reshape(value.shape) + step
        if not torch.equal(value, expected):
            return False
    return state["progress"] == {"step": step}


def _kill_mid_save(directory: Path, async_save: bool, delay: float) -> tuple[int, bool]:
    """Start the job, SIGKILL it ``delay`` s after its first complete save; the last step it
    reported complete, and whether the kill left a save unfinished (a ``.tmp-``/``.old-``
    directory: it landed inside a write, not between two)."""
    argv = [sys.executable, JOB, str(directory), *(["--async-save"] if async_save else [])]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first == "ready\n", first + proc.stderr.read()  # type: ignore[union-attr]
        lines.append(proc.stdout.readline())  # "saved 1" (the slowest: it starts the pools)
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
        reader.start()
        time.sleep(delay)
        assert proc.poll() is None, "the job ended before it was killed"
        proc.kill()
        proc.wait(timeout=30)
        reader.join(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    saved = [int(line.split()[1]) for line in lines if line.startswith("saved ")]
    unfinished = any(p.name.startswith((".tmp-", ".old-")) for p in directory.iterdir())
    return (saved[-1] if saved else 0), unfinished


def _check_after_kill(directory: Path, reported: int) -> int:
    """Every checkpoint left verifies and holds exactly its step's state; resume picks the
    newest, which is the last one reported complete or the one being written if it was
    published before the kill. Returns the resumed step."""
    for step, path in list_checkpoints(directory):
        try:
            verify(path)
        except CheckpointError as exc:  # a published checkpoint must be whole
            raise AssertionError(f"published checkpoint {path} does not verify: {exc}") from None
        state = _fresh_state()
        load(path, state, rng=False)
        assert _is_state_of(state, step), f"{path} verifies but holds another state"
    state = _fresh_state()
    resumed = Checkpointer(directory).resume(state)
    assert resumed is not None or reported == 0
    if resumed is None:
        return 0
    assert reported <= resumed <= reported + 1, (reported, resumed)
    assert _is_state_of(state, resumed)
    assert not [p.name for p in directory.iterdir() if not p.name.startswith("step-")]
    return resumed


def _run(tmp_path: Path, points: int, seed: int) -> list[tuple[bool, int, bool]]:
    """(async, resumed step, whether the kill landed inside a write) per kill."""
    rng = random.Random(seed)
    outcomes = []
    for i in range(points):
        async_save = i % 2 == 1
        directory = tmp_path / f"kill-{i}"
        reported, unfinished = _kill_mid_save(directory, async_save, rng.uniform(0.0, 1.0))
        resumed = _check_after_kill(directory, reported)
        outcomes.append((async_save, resumed, unfinished))
    return outcomes


def test_kills_during_saves_leave_only_good_checkpoints(tmp_path):
    outcomes = _run(tmp_path, points=4, seed=13)
    assert all(resumed >= 1 for _, resumed, _ in outcomes), outcomes


@pytest.mark.slow
def test_twenty_random_kill_points_during_sync_and_async_saves(tmp_path):
    outcomes = _run(tmp_path, points=20, seed=2026)
    assert all(resumed >= 1 for _, resumed, _ in outcomes), outcomes
    # Nearly all of the job's time is spent saving: most kills cut a write in the middle.
    inside = [unfinished for _, _, unfinished in outcomes]
    assert sum(inside) >= 5, outcomes
