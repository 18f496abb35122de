"""Two processes fed the same tensors get one warning saying how to shard; sharded data none."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stoker.runtime.same_data import fingerprint

JOB = Path(__file__).with_name("same_data_job.py")


def test_fingerprint_worked_example():
    # [tensors, elements, sum, sum of squares, position-weighted sum] (the module docstring)
    fp = fingerprint([torch.tensor([1, 2, 3])], torch.device("cpu"))
    assert fp.tolist() == [1, 3, 6, 14, 14]
    assert not torch.equal(fp, fingerprint([torch.tensor([3, 2, 1])], torch.device("cpu")))


def _run(*args: str) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run(
        [*cmd, str(JOB), *args], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done.stdout


# The sharded case is slow-marked (~7 s on an EPYC Zen 3): the warning is the same-data case.
@pytest.mark.parametrize(
    "shard", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["same", "sharded"]
)
def test_identical_data_on_two_processes_warns_once(shard):
    out = _run(*(["--shard"] if shard else []))
    warnings = [line for line in out.splitlines() if line.startswith("WARNING SameDataWarning")]
    if shard:
        assert warnings == []
    else:
        assert len(warnings) == 1, out
        assert "all 2 processes fed the model the same first batch" in warnings[0]
        assert "data[stoker.rank :: stoker.world_size]" in warnings[0]
