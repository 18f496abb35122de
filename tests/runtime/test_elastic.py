"""`stoker run --max-restarts`: a killed worker is restarted and resumes, with no user code."""

import json
import subprocess
import sys
from pathlib import Path

import torch

JOB = Path(__file__).with_name("elastic_job.py")


def _run(tmp_path: Path, name: str) -> dict:
    out = tmp_path / name
    cmd = [sys.executable, "-m", "stoker", "run", "--max-restarts", "1", str(JOB), str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return torch.load(out, weights_only=True)


def test_killed_worker_restarts_and_resumes_exactly(tmp_path, monkeypatch):
    monkeypatch.setenv("STOKER_RUNS_DIR", str(tmp_path / "runs"))
    killed = _run(tmp_path, "killed.pt")
    clean = _run(tmp_path, "clean.pt")
    assert killed.pop("resumed_from") == 6  # the last checkpoint before the kill at step 7
    assert clean.pop("resumed_from") is None
    for name, value in clean.items():
        assert torch.equal(killed[name], value), name
    records = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*/record.json")]
    attempts = sorted(len(r.get("attempts") or []) for r in records)
    assert all(r["status"] == "finished" for r in records)
    assert attempts[-1] > attempts[0]  # the killed run's record lists its restart
