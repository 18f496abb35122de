"""The planted-problem suite: each script under planted/ has one deliberate inefficiency on the
line marked ``# PLANTED``; run with ``--clean`` it is its twin with the fix applied.

The doctor must name the planted code at that line, and find nothing at all in the twins.
Scripts run in this process at one intra-op thread pinned to one core: the suite tests what the
doctor concludes, and a single thread keeps timings sane on a loaded 2-core machine (OpenMP
threads competing with other processes for cores make every op's time erratic). The cpu-threads
case is about threads, so it runs unpinned at the default and only where cores are free.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from stoker.doctor import DoctorConfig, diagnose_script
from stoker.runtime import bf16_is_fast

PLANTED = Path(__file__).parent / "planted"
CASES = sorted(p.stem for p in PLANTED.glob("*.py"))
# The matmul-precision case plants whichever precision this machine is slow at.
PRECISION_CODES = {True: "fp32-matmul", False: "bf16-matmul"}


def _code(case: str) -> str:
    if case == "matmul_precision":
        return PRECISION_CODES[bf16_is_fast("cpu")]
    return case.replace("_", "-")


CONFIG = DoctorConfig(warmup_steps=2, window_steps=3, attribution_steps=2, stop_after_window=True)


def _planted_line(path: Path) -> int:
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if "# PLANTED" in line:
            return number
    raise AssertionError(f"{path} has no '# PLANTED' line")


def _threads_scale() -> float:
    """Speed-up of the planted script's kind of step (an MLP forward+backward) from one
    thread to all cores, right now (best of 5). A bare AMX matrix product does not scale on
    every machine while the step's elementwise ops do, so this times the step itself."""
    model = torch.nn.Sequential(
        torch.nn.Linear(512, 2048), torch.nn.GELU(), torch.nn.Linear(2048, 512)
    )
    x = torch.randn(512, 512)

    bf16 = bf16_is_fast("cpu")

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model(x).float().square().mean().backward()

    saved, best = torch.get_num_threads(), {}
    try:
        for n in (1, len(os.sched_getaffinity(0))):
            torch.set_num_threads(n)
            step()
            times = []
            for _ in range(5):
                start = time.perf_counter()
                for _ in range(5):
                    step()
                times.append(time.perf_counter() - start)
            best[n] = min(times)
    finally:
        torch.set_num_threads(saved)
    return best[1] / best[max(best)]


@pytest.fixture
def threads(request: pytest.FixtureRequest):
    saved, cores = torch.get_num_threads(), os.sched_getaffinity(0)
    if request.param == "cpu_threads":
        scale = _threads_scale()
        for _ in range(4):  # a process an earlier test started may still be exiting: wait
            if scale >= 1.15:
                break
            time.sleep(2.0)
            scale = max(scale, _threads_scale())
        if scale < 1.15:  # another process holds a core: the case cannot be decided now
            pytest.fail(
                f"all cores give {scale:.2f}x one thread's speed now: no free core to measure "
                "the cpu-threads case on; run the suite on an otherwise idle machine"
            )
    else:  # one thread pinned to one core: nothing to say about threads, and sane timings
        os.sched_setaffinity(0, {min(cores)})
        torch.set_num_threads(1)
    yield request.param
    os.sched_setaffinity(0, cores)
    torch.set_num_threads(saved)


def test_every_code_with_a_cpu_cause_is_planted() -> None:
    from stoker.doctor import RULES

    # no-pin-memory needs CUDA; padding-waste and rank-imbalance read the data accounting.
    untestable_here = {"no-pin-memory", "padding-waste", "rank-imbalance"}
    planted = {_code(c) for c in CASES if c != "matmul_precision"} | set(PRECISION_CODES.values())
    assert planted == set(RULES) - untestable_here


@pytest.mark.parametrize("threads", CASES, indirect=True)
def test_planted_problem_is_named_at_its_line(threads: str) -> None:
    path = PLANTED / f"{threads}.py"
    code = _code(threads)
    report = diagnose_script(path, [], CONFIG)
    where = {f.location for f in report.findings if f.code == code}
    expected = f"{path.name}:{_planted_line(path)}"
    assert any(w is not None and w.endswith(expected) for w in where), report.render_text()


@pytest.mark.parametrize("threads", CASES, indirect=True)
def test_clean_twin_has_no_findings(threads: str) -> None:
    report = diagnose_script(PLANTED / f"{threads}.py", ["--clean"], CONFIG)
    assert report.findings == [], report.render_text()


@pytest.mark.parametrize("threads", ["matmul_precision"], indirect=True)
@pytest.mark.parametrize("injected", ["0.02", "6"])
def test_precision_rules_follow_an_injected_probe_answer(threads, injected, monkeypatch):
    """The hardware probe's answer decides which precision is planted and which rule may fire;
    a "bf16 is fast" answer the model contradicts is overruled by timing the model itself."""
    real_fast = bf16_is_fast("cpu")
    monkeypatch.setenv("STOKER_BF16_SPEEDUP", injected)
    path = PLANTED / "matmul_precision.py"
    planted = diagnose_script(path, [], CONFIG)
    clean = diagnose_script(path, ["--clean"], CONFIG)
    codes = {f.code for f in planted.findings}
    if injected == "0.02":  # bf16 is planted; computing in fp32 is the fix
        assert "bf16-matmul" in codes, planted.render_text()
    elif real_fast:  # fp32 is planted, and bf16 really is faster here
        assert "fp32-matmul" in codes, planted.render_text()
    else:  # told bf16 is fast, but the model measured slower under bf16: no advice to switch
        assert "fp32-matmul" not in codes, planted.render_text()
    assert "fp32-matmul" not in codes or "bf16-matmul" not in codes
    assert not {"fp32-matmul", "bf16-matmul"} & {f.code for f in clean.findings}, (
        clean.render_text()
    )
    assert "this hardware favours" in planted.render_text()
