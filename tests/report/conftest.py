"""Runs for the report tests: real ones from a tiny stoker loop in a git repository (one
killed and resumed, one with edited code and another learning rate), and a planted one whose
every text is hostile."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stoker.doctor import Finding, Report

JOB = Path(__file__).with_name("tiny_job.py")
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>" onload="alert(2)'


def _job(repo: Path, run_dir: Path, *args: str, code: int = 0) -> None:
    # The doctor is on only where the job asks for it (--doctor); tests turn it off globally.
    env = {
        **os.environ,
        "STOKER_RUN_DIR": str(run_dir),
        "OMP_NUM_THREADS": "1",
        "STOKER_DOCTOR": "1",
    }
    proc = subprocess.run(
        [sys.executable, "tiny_job.py", *args],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == code, proc.stderr[-3000:]


def _finding_at(repo: Path, text: str) -> str:
    """``tiny_job.py:N`` of the first line containing ``text``."""
    lines = (repo / "tiny_job.py").read_text().splitlines()
    return f"tiny_job.py:{next(i for i, line in enumerate(lines, 1) if text in line)}"


@pytest.fixture(scope="session")
def real_runs(tmp_path_factory):
    """``(a, b)``: a is killed (SIGKILL) at step 25 and resumed from its step-20 checkpoint,
    with the doctor on; b runs edited code with lr 0.1, and its doctor.json (written by the
    doctor's own Report) holds one finding at a line of the script."""
    repo = tmp_path_factory.mktemp("project")
    shutil.copy(JOB, repo / "tiny_job.py")
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "first"]):
        subprocess.run([*GIT, "-C", str(repo), *args], check=True, capture_output=True)
    a, b = repo / "runs" / "a", repo / "runs" / "b"
    _job(repo, a, "--doctor", "--die-at", "25", code=-9)
    _job(repo, a, "--doctor")
    text = (repo / "tiny_job.py").read_text()
    edited = text.replace("torch.nn.Linear(8, 32)", "torch.nn.Linear(8, 32, bias=True)")
    assert edited != text
    (repo / "tiny_job.py").write_text(edited)
    _job(repo, b, "--lr", "0.1")
    summary = json.loads((a / "doctor.json").read_text())["summary"]
    finding = Finding(
        code="host-sync",
        severity="medium",
        share=0.12,
        title="loss.item() makes the host wait for the device every step",
        fix="log the tensor: stoker.log({'loss': loss.detach()})",
        location=_finding_at(repo, "stoker.backward(loss)"),
    )
    Report(findings=[finding], summary=summary).write_json(b)
    return a, b


@pytest.fixture
def hostile_text():
    return HOSTILE


@pytest.fixture
def hostile_run(tmp_path):
    """A run directory written by hand whose every string tries to break out of the page."""
    run = tmp_path / "hostile"
    run.mkdir()
    (tmp_path / "evil.py").write_text("SECRET = 'outside the run'\n")
    record = {
        "schema": 1,
        "id": HOSTILE,
        "name": HOSTILE,
        "status": "failed",
        "error": {"type": HOSTILE, "message": HOSTILE, "traceback": HOSTILE},
        "command": {"argv": [HOSTILE], "cwd": str(run), "script_args": [HOSTILE]},
        "config": {HOSTILE: HOSTILE, "nested": {"x": HOSTILE}},
        "settings": {"device": HOSTILE},
        "seeds": {},
        "git": {"repo": HOSTILE, "revision": HOSTILE, "dirty": True, "patch": "code.patch"},
        "packages": {HOSTILE: HOSTILE},
        "versions": {"python": HOSTILE},
        "host": {"hostname": HOSTILE},
        "world_size": 1,
        "started": "2026-01-01T00:00:00+00:00",
        "ended": "2026-01-01T00:01:00+00:00",
        "attempts": [
            {"started": "2026-01-01T00:00:00+00:00", "argv": [HOSTILE]},
            {
                "started": "2026-01-01T00:00:30+00:00",
                "argv": [HOSTILE],
                "resumed_from": {"step": 3, "checkpoint": HOSTILE, "changed": {HOSTILE: {}}},
            },
        ],
        "summary": {"steps": 5},
    }
    (run / "record.json").write_text(json.dumps(record))
    (run / "code.patch").write_text(f"+{HOSTILE}\n-{HOSTILE}\n")
    lines = [
        {"step": s, "time": 1767225600.0 + s, "loss": 1.0 / s, HOSTILE: float(s)}
        for s in range(1, 6)
    ]
    lines[2]["loss"] = float("nan")
    text = "".join(json.dumps(line) + "\n" for line in lines)
    (run / "metrics.jsonl").write_text(text + '{"step": 6, "loss": 0.')  # torn last line
    doctor = {
        "version": 1,
        "summary": {"device": HOSTILE, "phases_ms": {HOSTILE: 1.0, "forward": 2.0}},
        "findings": [
            {
                "code": HOSTILE,
                "severity": HOSTILE,
                "share": 0.5,
                "title": HOSTILE,
                "fix": HOSTILE,
                "location": "../evil.py:1",
            },
        ],
    }
    (run / "doctor.json").write_text(json.dumps(doctor))
    return run
