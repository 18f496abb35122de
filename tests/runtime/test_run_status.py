"""record.json says how a Stoker run really ended: finished, failed (every error path) or killed."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stoker import Stoker
from stoker.checkpoint import list_checkpoints
from stoker.records import RecordConfig

JOB = str(Path(__file__).with_name("status_job.py"))

# mode -> (how it is launched, expected status, error type, words of the error message)
CASES = {
    "finished": ("python", "finished", None, None),
    "error": ("python", "failed", "RuntimeError", "the loss went to the moon"),
    "stoker-error": ("python", "failed", "StokerError", "batch_size=0"),
    "stoker-error-under-stoker-run": ("stoker run", "failed", "StokerError", "batch_size=0"),
    "checkpoint-raise": ("python", "failed", "CheckpointError", "could not save checkpoint"),
    "interrupt": ("python", "killed", "KeyboardInterrupt", "interrupted"),
}


@pytest.fixture(scope="module")
def ended(tmp_path_factory):
    """Every case run once, concurrently: {mode: (completed process, run directory)}."""
    root = tmp_path_factory.mktemp("status")
    procs = {}
    for mode, (launcher, *_) in CASES.items():
        run_dir = root / mode
        env = dict(os.environ, STOKER_RUN_DIR=str(run_dir), OMP_NUM_THREADS="1")
        job_mode = mode.removesuffix("-under-stoker-run")
        cmd = [sys.executable, JOB, job_mode]
        if launcher == "stoker run":
            cmd = [sys.executable, "-m", "stoker", "run", JOB, job_mode]
        procs[mode] = (
            subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            ),
            run_dir,
        )
    out = {}
    try:
        for mode, (proc, run_dir) in procs.items():
            stdout, stderr = proc.communicate(timeout=180)
            out[mode] = (
                subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr),
                run_dir,
            )
    finally:
        for proc, _ in procs.values():
            proc.kill()
    return out


@pytest.mark.parametrize("mode", list(CASES))
def test_record_status_says_how_the_run_ended(ended, mode):
    launcher, status, error_type, words = CASES[mode]
    done, run_dir = ended[mode]
    record = json.loads((run_dir / "record.json").read_text())
    assert record["status"] == status, done.stderr[-2000:]
    checkpoints = [step for step, _ in list_checkpoints(run_dir / "checkpoints")]
    if status == "finished":
        assert done.returncode == 0, done.stderr[-2000:]
        assert record["error"] is None
        assert checkpoints == [3]  # the final checkpoint
        return
    assert done.returncode != 0
    assert record["error"]["type"] == error_type
    assert words in record["error"]["message"]
    assert not checkpoints  # a failed or interrupted run's state is not checkpointed
    if mode == "interrupt":
        assert done.returncode in (-signal.SIGINT, 128 + signal.SIGINT)
    if error_type in ("StokerError", "CheckpointError"):  # one line, no traceback
        assert "Traceback" not in done.stderr
        errors = [line for line in done.stderr.splitlines() if line.startswith("stoker: error:")]
        assert errors and words in errors[0], done.stderr[-2000:]
        # `stoker run` adds one line of its own: which worker failed.
        assert len(errors) == (2 if launcher == "stoker run" else 1), errors


def test_an_earlier_error_in_the_session_does_not_fail_this_run(tmp_path, monkeypatch):
    # A REPL or notebook keeps the last uncaught error in sys.last_value, for good.
    monkeypatch.setattr(sys, "last_value", RuntimeError("yesterday's typo"), raising=False)
    run = tmp_path / "run"
    stoker = Stoker(device="cpu", precision="fp32", record=RecordConfig(directory=run))
    model = torch.nn.Linear(4, 1)
    model, optimizer = stoker.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    for _ in range(3):
        stoker.backward(model(torch.randn(8, 4)).square().mean())
        optimizer.step()
        optimizer.zero_grad()
    stoker.close()
    assert json.loads((run / "record.json").read_text())["status"] == "finished"
    assert [step for step, _ in list_checkpoints(run / "checkpoints")] == [3]


def test_close_with_the_error_records_a_failed_run(tmp_path):
    run = tmp_path / "run"
    stoker = Stoker(device="cpu", precision="fp32", record=RecordConfig(directory=run))
    model = torch.nn.Linear(4, 1)
    model, optimizer = stoker.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    stoker.backward(model(torch.randn(8, 4)).square().mean())
    optimizer.step()
    stoker.close(failed=RuntimeError("caught by the user"))
    record = json.loads((run / "record.json").read_text())
    assert record["status"] == "failed" and record["error"]["message"] == "caught by the user"
    assert list_checkpoints(run / "checkpoints") == []
