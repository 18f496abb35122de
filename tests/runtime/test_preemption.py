"""Preemption: a signal -> the checkpoint of the step -> status ``preempted`` -> exit code 143
-> ``resume="auto"`` ends bitwise equal to an uninterrupted run (issue 13 item 1)."""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from stoker import PREEMPTED_EXIT_CODE, PreemptionConfig, Stoker, StokerError
from stoker.checkpoint import list_checkpoints, verify
from stoker.report import load_run
from stoker.runtime.distributed import DistributedContext
from stoker.runtime.launch import LaunchConfig, grace_seconds, torchrun_argv
from stoker.runtime.preemption import PreemptionListener
from stoker.runtime.step import Alarm

JOB = str(Path(__file__).with_name("preempt_job.py"))
STEPS = 30
SYNC_OPS = ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero")


def _job(run_dir: Path, *args: str, nproc: int = 1, timeout: float = 240):
    env = {**os.environ, "STOKER_RUN_DIR": str(run_dir)}
    launcher = ["-m", "stoker", "run", "--nproc", str(nproc)] if nproc > 1 else []
    out = run_dir.parent / f"{run_dir.name}.pt"
    cmd = [sys.executable, *launcher, JOB, str(out), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    return done, out


def _final(out: Path) -> dict:
    return torch.load(out, weights_only=True)


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name, value in b.items():
        if name != "resumed_from":
            assert torch.equal(a[name], value), name


def _assert_preempted(done, run_dir: Path, signal_name: str, step: int) -> None:
    assert done.returncode == PREEMPTED_EXIT_CODE, done.stderr[-3000:]
    record = json.loads((run_dir / "record.json").read_text())
    assert record["status"] == "preempted"
    assert record["preempted"] == {"signal": signal_name, "step": step}
    assert record["error"] is None
    steps = [s for s, _ in list_checkpoints(run_dir / "checkpoints")]
    assert steps[-1] == step, steps  # the preemption's checkpoint is the newest ...
    verify(run_dir / "checkpoints" / f"step-{step:08d}")  # ... and whole
    assert f"preempted at step {step}" in done.stderr
    labels = [event.label for event in load_run(run_dir).events]  # the HTML report's timeline
    assert f"run preempted by {signal_name} at step {step}" in labels, labels


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    done, out = _job(tmp_path_factory.mktemp("ref") / "run", "--steps", str(STEPS))
    assert done.returncode == 0, done.stderr[-3000:]
    return _final(out)


_EARLY, _LATE = random.Random(1).sample(range(2, STEPS - 1), 2)  # 6 and 20


@pytest.mark.parametrize("step", [_EARLY, pytest.param(_LATE, marks=pytest.mark.slow)])
def test_sigterm_at_a_random_step_saves_it_and_resumes_bitwise(tmp_path, reference, step):
    run_dir = tmp_path / "run"
    done, out = _job(run_dir, "--steps", str(STEPS), "--signal-at", str(step))
    # One process: the signal came during step `step`, whose end sees it.
    _assert_preempted(done, run_dir, "SIGTERM", step)
    assert not out.exists()  # the loop did not go on
    resumed, out = _job(run_dir, "--steps", str(STEPS))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = _final(out)
    assert int(final["resumed_from"]) == step
    _assert_same(final, reference)
    assert json.loads((run_dir / "record.json").read_text())["status"] == "finished"


def test_more_signals_during_the_save_change_nothing(tmp_path, reference):
    # After the first SIGTERM a thread sends another every 2 ms until the process is gone:
    # during the agreement, the (async) save and the exit.
    run_dir = tmp_path / "run"
    args = ("--steps", str(STEPS), "--async-save")
    done, _ = _job(run_dir, *args, "--signal-at", "13", "--storm")
    _assert_preempted(done, run_dir, "SIGTERM", 13)
    resumed, out = _job(run_dir, *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same(_final(out), reference)


def test_without_a_run_directory_it_says_nothing_was_saved(tmp_path):
    done, _ = _job(tmp_path / "run", "--no-record", "--signal-at", "5", "--signal", "SIGUSR1")
    assert done.returncode == PREEMPTED_EXIT_CODE, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if "preempted" in line]
    assert len(lines) == 1 and "nothing could be saved" in lines[0], done.stderr[-3000:]
    assert "SIGUSR1" in lines[0] and "143" in lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_sigterm_to_one_rank_stops_both_at_one_step(tmp_path, strategy):
    # Rank 1 alone gets SIGTERM during step 9; the ranks agree at the end of step 10 (the
    # all-reduce started at step 9's end is read at step 10's), and both save step 10 (under
    # FSDP each its own shards, compared here on rank 0).
    steps = "20"
    ref_done, ref_out = _job(tmp_path / "ref", "--steps", steps, "--strategy", strategy, nproc=2)
    assert ref_done.returncode == 0, ref_done.stderr[-3000:]
    run_dir = tmp_path / "run"
    args = ("--steps", steps, "--signal-at", "9", "--signal-rank", "1", "--strategy", strategy)
    done, _ = _job(run_dir, *args, nproc=2)
    _assert_preempted(done, run_dir, "SIGTERM", 10)
    ranks = {p.name for p in (run_dir / "checkpoints" / "step-00000010").glob("rank-*.json")}
    assert ranks == {"rank-00000.json", "rank-00001.json"}
    assert "exit code 143" in done.stderr  # stoker run's own line
    resumed, out = _job(run_dir, "--steps", steps, "--strategy", strategy, nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = _final(out)
    assert int(final["resumed_from"]) == 10
    _assert_same(final, _final(ref_out))


def test_sigusr1_sent_to_stoker_run_only_reaches_the_workers(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "STOKER_RUN_DIR": str(run_dir)}
    cmd = [sys.executable, "-m", "stoker", "run", "--nproc", "2", JOB, str(tmp_path / "o.pt")]
    # The ranks exchange about every 0.2 s of training, the interval measured on the fast
    # first steps: the adaptive path, with steps that slow down (50 ms) after step 3.
    cmd += ["--steps", "400", "--wait-for-signal", "3", "--agree-every", "0.2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    err: list[str] = []
    threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True).start()
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            if line == "step 4\n":
                proc.send_signal(signal.SIGUSR1)  # the launcher's pid only
                break
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(0.2)
    stderr = "".join(err)
    assert code == PREEMPTED_EXIT_CODE, stderr[-3000:]
    record = json.loads((run_dir / "record.json").read_text())
    assert record["status"] == "preempted", stderr[-3000:]
    assert record["preempted"]["signal"] == "SIGUSR1"
    step = record["preempted"]["step"]
    assert 4 <= step < 400
    assert [s for s, _ in list_checkpoints(run_dir / "checkpoints")][-1] == step
    assert "workers get torchrun's 30 s" in stderr  # no save measured yet in a new directory
    # The next launch in this directory sizes the grace from the preemption's measured save.
    grace, why = grace_seconds(run_dir)
    assert grace >= 30 and "the last save took" in why


# -- in process --------------------------------------------------------------------------------
def _loop(preemption: bool) -> int:
    stoker = Stoker(device="cpu", precision="fp32", record=False, preemption=preemption)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 32), torch.nn.Linear(32, 50))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = stoker.prepare(model, optimizer)
    ids = torch.randint(0, 50, (6, 4, 8), generator=torch.Generator().manual_seed(0))
    with profile(activities=[ProfilerActivity.CPU]) as trace:
        for step in range(6):
            logits = model(ids[step])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[step].flatten())
            stoker.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
    stoker.close()
    return sum(evt.count for evt in trace.key_averages() if evt.key in SYNC_OPS)


def test_the_listener_adds_no_host_sync():
    assert _loop(preemption=True) == _loop(preemption=False)


def test_the_ranks_exchange_adds_no_host_sync(tmp_path, monkeypatch):
    # The all-reduce path, on a real gloo group (of one process: the listener is told it is
    # distributed): start at one step's end, read at the next, no sync op either way.
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        ctx = DistributedContext(rank=0, world_size=2)
        config = PreemptionConfig(agree_every_s=0)  # an exchange at every step
        listener = PreemptionListener(config, _NoServices(), ctx, Alarm())
        try:
            with profile(activities=[ProfilerActivity.CPU]) as trace:
                for step in range(1, 6):
                    listener.on_step_end(step)
            assert sum(e.count for e in trace.key_averages() if e.key in SYNC_OPS) == 0
            assert listener.agreed == 0
            listener.flag.received = signal.SIGUSR1  # as the handler would
            listener.on_step_end(6)  # sends it
            assert listener.agreed == 0
            with pytest.raises(SystemExit) as stopped:
                listener.on_step_end(7)  # reads it: agreed (nothing to save: exits at once)
            assert stopped.value.code == PREEMPTED_EXIT_CODE
            assert listener.agreed == signal.SIGUSR1
        finally:
            listener.close(None)
    finally:
        dist.destroy_process_group()


def test_fast_steps_exchange_rarely(tmp_path, monkeypatch):
    # Steps microseconds apart and the default agree_every_s=1.0: an exchange every 100 steps
    # (the cap) once the step time is measured.
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    started = []
    real = dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: started.append(1) or real(*a, **k))
    try:
        ctx = DistributedContext(rank=0, world_size=2)
        listener = PreemptionListener(PreemptionConfig(), _NoServices(), ctx, Alarm())
        try:
            for step in range(1, 250):
                listener.on_step_end(step)
            # Steps 1, 2 (reading step 1's proposal: 1), 3 (reading step 2's: the cap, 100
            # steps, from the measured microseconds), then 103 and 203.
            assert len(started) == 5, started
            # ... and the listener's own account of them (what benchmarks/preemption.py reads).
            assert listener.exchanges == 5 and 0 < listener.exchange_seconds < 5
        finally:
            listener.close(None)
    finally:
        dist.destroy_process_group()


class _NoServices:
    checkpointer = None
    state = None
    preempted = None


def test_handlers_are_installed_and_put_back():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    stoker = Stoker(device="cpu", precision="fp32", record=False)
    try:
        for number, handler in before.items():
            assert signal.getsignal(number) != handler, number
    finally:
        stoker.close()
    assert {s: signal.getsignal(s) for s in before} == before
    off = Stoker(device="cpu", precision="fp32", record=False, preemption=False)
    assert {s: signal.getsignal(s) for s in before} == before
    off.close()


def test_bad_preemption_argument_is_one_clear_error():
    with pytest.raises(StokerError, match="preemption='yes'"):
        Stoker(device="cpu", precision="fp32", record=False, preemption="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize("signals", [("SIGKILL",), ("SIGNOPE",), "SIGTERM", ()])
def test_config_refuses_signals_it_cannot_handle(signals):
    with pytest.raises(StokerError, match="PreemptionConfig"):
        PreemptionConfig(signals=signals)


@pytest.mark.parametrize("seconds", [-1, 61, "1"])
def test_config_refuses_an_exchange_interval_out_of_range(seconds):
    with pytest.raises(StokerError, match="agree_every_s"):
        PreemptionConfig(agree_every_s=seconds)


def test_stoker_run_hands_sigusr1_and_the_grace_to_torchrun(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("")
    argv = torchrun_argv(LaunchConfig(script=str(script), grace=75))
    assert argv[argv.index("--signals-to-handle") + 1].split(",")[-1] == "SIGUSR1"
    assert argv[argv.index("--shutdown-timeout") + 1] == "75"
    (tmp_path / "record.json").write_text(
        json.dumps({"checkpoint_seconds": {"step": 9, "seconds": 20.0}})
    )
    assert grace_seconds(tmp_path)[0] == 70  # 3 x 20 s + 10 s
    (tmp_path / "record.json").write_text(
        json.dumps({"checkpoint_seconds": {"step": 9, "seconds": 1.0}})
    )
    assert grace_seconds(tmp_path)[0] == 30  # never below torchrun's default
