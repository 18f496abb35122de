"""`stoker run --nproc 2` trains exactly like one process with the same global batch."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

JOB = Path(__file__).with_name("ddp_job.py")


def _run(tmp_path: Path, nproc: int, batch: int, accumulate: bool, torchrun: bool = False) -> dict:
    out = tmp_path / f"out-{nproc}-{torchrun}.pt"
    if torchrun:  # plain torchrun, no stoker launcher: the script must work the same
        launcher = ["torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    else:
        launcher = ["stoker", "run", "--nproc", str(nproc)]
    cmd = [sys.executable, "-m", *launcher, str(JOB), str(out)]
    cmd += ["--batch", str(batch)] + (["--accumulate"] if accumulate else [])
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return torch.load(out, weights_only=True)


# (plain is slow-marked: accumulate-tokens covers the same path and more, in the default run)
@pytest.mark.parametrize(
    "accumulate",
    [pytest.param(False, marks=pytest.mark.slow), True],
    ids=["plain", "accumulate-tokens"],
)
def test_two_processes_match_one(tmp_path, accumulate):
    two = _run(tmp_path, nproc=2, batch=4, accumulate=accumulate)
    one = _run(tmp_path, nproc=1, batch=8, accumulate=accumulate)
    assert two["steps"] == one["steps"] == (4 if accumulate else 8)
    # Summed token losses per step: same samples, same weights, same trajectory.
    torch.testing.assert_close(two["losses"], one["losses"], atol=1e-5, rtol=1e-5)
    for name, w in one["weights"].items():
        torch.testing.assert_close(two["weights"][name], w, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_plain_torchrun_runs_a_stoker_script(tmp_path):
    two = _run(tmp_path, nproc=2, batch=4, accumulate=False, torchrun=True)
    one = _run(tmp_path, nproc=1, batch=8, accumulate=False)
    torch.testing.assert_close(two["losses"], one["losses"], atol=1e-5, rtol=1e-5)
