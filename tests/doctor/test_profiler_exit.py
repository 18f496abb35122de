"""A script that raises inside the doctor's profiled window ends like any failing Python script:
exit status 1 and its own error, never a segfault of a profiler left running at exit."""

import os
import subprocess
import sys

import pytest

LOOP = """
import torch
model = torch.nn.Linear(8, 8)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
{setup}
for step in range(1, 30):
    loss = model(torch.randn(4, 8)).pow(2).mean()
    {backward}
    optimizer.step()
    optimizer.zero_grad()
    if step == 7:  # the default window profiles steps 6-10
        raise RuntimeError("user bug at step 7")
"""
SETUPS = {
    "plain-doctor": (
        "from stoker.doctor import Doctor, DoctorConfig\n"
        "doctor = Doctor(DoctorConfig(probes=False)).attach()"
    ),
    "stoker-loop": (
        "from stoker import Stoker\n"
        "stoker = Stoker(device='cpu', precision='fp32')\n"
        "model, optimizer = stoker.prepare(model, optimizer)"
    ),
}


def _script(tmp_path, setup):
    backward = "stoker.backward(loss)" if setup == "stoker-loop" else "loss.backward()"
    path = tmp_path / "train.py"
    path.write_text(LOOP.format(setup=SETUPS.get(setup, ""), backward=backward))
    return path


def _run(cmd, tmp_path):
    env = {**os.environ, "STOKER_DOCTOR": "1", "STOKER_RUNS_DIR": str(tmp_path / "runs")}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)


@pytest.mark.parametrize("setup", list(SETUPS))
def test_an_error_in_the_window_exits_1_with_the_users_traceback(tmp_path, setup):
    done = _run([sys.executable, str(_script(tmp_path, setup))], tmp_path)
    assert done.returncode == 1, (done.returncode, done.stderr[-2000:])
    assert done.stderr.rstrip().endswith("RuntimeError: user bug at step 7")


def test_stoker_doctor_on_a_script_failing_in_the_window_exits_1_in_one_line(tmp_path):
    script = _script(tmp_path, "none")
    done = _run([sys.executable, "-m", "stoker", "doctor", "--no-probes", str(script)], tmp_path)
    assert done.returncode == 1, (done.returncode, done.stderr[-2000:])
    last = done.stderr.rstrip().splitlines()[-1]
    assert last.startswith("stoker: error: train.py raised RuntimeError at train.py:")
    assert "RuntimeError: user bug at step 7" in done.stderr  # the script's own traceback first
