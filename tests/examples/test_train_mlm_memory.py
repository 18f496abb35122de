"""Issue 11: the main job's memory does not grow with steps (it once sawed 430 -> 1,150 MB every
1,024 steps). Runs 3,000 steps in a child process and samples its resident memory."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).parents[2] / "examples" / "train_mlm.py"


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _steps_logged(runs: Path) -> int:
    logs = list(runs.glob("*/metrics.jsonl"))
    if not logs:
        return 0
    text = logs[0].read_text()
    last = [line for line in text.splitlines() if '"loss"' in line][-1:]
    return json.loads(last[0])["step"] if last else 0


@pytest.mark.slow
def test_rss_stays_flat_over_3000_steps(tmp_path):
    if not Path("/proc/self/status").exists():
        pytest.fail("this test reads /proc/<pid>/status (Linux); it cannot measure RSS here")
    env = {**os.environ, "STOKER_RUNS_DIR": str(tmp_path), "STOKER_DOCTOR": "0"}
    args = ["--steps", "3000", "--batch-size", "4", "--eval-batches", "1", "--log-every", "100"]
    child = subprocess.Popen(
        [sys.executable, str(EXAMPLE), *args],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    at_100, peak = None, 0.0
    try:
        while child.poll() is None:
            rss = _rss_mb(child.pid)
            step = _steps_logged(tmp_path)
            if at_100 is None and step >= 100:
                at_100 = rss
            if at_100 is not None and step < 3000:
                peak = max(peak, rss)
            time.sleep(0.25)
    finally:
        child.kill()
    assert child.returncode in (0, -9), child.returncode
    assert at_100 is not None, "the run never reached step 100"
    print(f"RSS at step 100: {at_100:.0f} MB, peak to step 3000: {peak:.0f} MB")
    assert peak <= 1.10 * at_100, (at_100, peak)
