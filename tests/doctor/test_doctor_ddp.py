"""The runtime's doctor in a 2-process DDP or FSDP run: rank 0's report never waits on the
other rank."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

JOB = str(Path(__file__).with_name("ddp_job.py"))


@pytest.mark.parametrize("strategy", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_two_process_run_with_the_doctor_exits_with_its_report(tmp_path, strategy):
    # The doctor's probes re-run the captured model forward and backward on rank 0 alone, at
    # close(). Through the DDP wrapper that issued collectives rank 1 never joined: a hang.
    # A sharded model cannot run on one rank at all (each holds half the weights): not probed.
    run_dir = tmp_path / "run"
    env = dict(
        os.environ,
        STOKER_DOCTOR="1",
        STOKER_RUN_DIR=str(run_dir),
        STOKER_COLLECTIVE_TIMEOUT="60",  # longer than the probes; the test's own bound is 150 s
        OMP_NUM_THREADS="1",
    )
    cmd = [sys.executable, "-m", "stoker", "run", "--nproc", "2", JOB, strategy]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "rank 0 trained 20 steps" in done.stdout and "rank 1 trained 20 steps" in done.stdout
    report = json.loads((run_dir / "doctor.json").read_text())
    assert report["summary"]["profiled_steps"] == 5
    if strategy == "ddp":
        assert report["probes"], "the probes ran (on the model inside DDP)"
    else:  # only the optimizer's probe (on copies of this rank's shards), no forward re-run
        assert report["probes"] and all(name.startswith("fused") for name in report["probes"])
    assert json.loads((run_dir / "record.json").read_text())["status"] == "finished"
