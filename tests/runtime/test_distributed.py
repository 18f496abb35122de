"""stoker's own collectives outside the step fail with one line when a rank never comes."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stoker.errors import StokerError
from stoker.runtime.distributed import collective_timeout

JOB = str(Path(__file__).with_name("stall_job.py"))
TIMEOUT_S = 6  # also bounds the group's start-up (DDP's parameter check): 3 s failed at load 9

# (where, the rank that never comes there)
CASES = [("barrier", 1), ("barrier", 0), ("checkpoint", 1), ("wait", 1), ("tokens", 1)]
WHAT = {
    "barrier": "the end of the run (Stoker.close)",
    "checkpoint": "a checkpoint's agreement",
    "wait": "Stoker.wait_for_everyone()",
    "tokens": "TokenCounter.summary()",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def stalled(tmp_path_factory):
    """Each case as 2 processes, all cases at once: {case: (waiting rank's result, run dir)}."""
    root = tmp_path_factory.mktemp("stall")
    jobs = {}
    for at, stall in CASES:
        run_dir = root / f"{at}-{stall}"
        env = dict(
            os.environ,
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port()),
            WORLD_SIZE="2",
            STOKER_RUN_DIR=str(run_dir),
            STOKER_COLLECTIVE_TIMEOUT=str(TIMEOUT_S),
            OMP_NUM_THREADS="1",
        )
        jobs[at, stall] = [
            subprocess.Popen(
                [sys.executable, JOB, str(stall), at],
                env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for rank in (0, 1)
        ]
    out = {}
    try:
        for (at, stall), procs in jobs.items():
            waiting = procs[1 - stall]
            stdout, stderr = waiting.communicate(timeout=90)  # a hang fails here
            ended = time.time()
            out[at, stall] = (waiting.returncode, stdout, stderr, ended, root / f"{at}-{stall}")
    finally:
        for procs in jobs.values():
            for proc in procs:
                proc.kill()
                proc.communicate()
    return out


@pytest.mark.parametrize(("at", "stall"), CASES, ids=[f"{a}-rank{s}-missing" for a, s in CASES])
def test_the_waiting_rank_exits_with_one_line_naming_the_missing_one(stalled, at, stall):
    code, stdout, stderr, ended, run_dir = stalled[at, stall]
    assert code == 1, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("stoker: error:")]
    assert len(errors) == 1, stderr[-3000:]
    assert f"rank {1 - stall}: rank {stall} did not reach {WHAT[at]}" in errors[0]
    assert f"STOKER_COLLECTIVE_TIMEOUT={TIMEOUT_S}" in errors[0]
    assert "Traceback" not in stderr
    waited = ended - float(stdout.split("waiting from ")[1].split()[0])
    assert TIMEOUT_S - 0.5 < waited < TIMEOUT_S + 15  # the bound, plus the exit itself
    if at == "checkpoint":  # rank 0 keeps the record: the run failed, with the same message
        record = json.loads((run_dir / "record.json").read_text())
        assert record["status"] == "failed"
        assert record["error"]["type"] == "CollectiveTimeout"
        assert record["error"]["message"] in errors[0]


def test_the_timeout_is_validated(monkeypatch):
    monkeypatch.setenv("STOKER_COLLECTIVE_TIMEOUT", "2.5")
    assert collective_timeout() == 2.5
    monkeypatch.delenv("STOKER_COLLECTIVE_TIMEOUT")
    assert collective_timeout() == 300.0
    for bad in ("soon", "0", "-1", "inf"):
        monkeypatch.setenv("STOKER_COLLECTIVE_TIMEOUT", bad)
        with pytest.raises(StokerError, match=r"STOKER_COLLECTIVE_TIMEOUT=.*positive number"):
            collective_timeout()
