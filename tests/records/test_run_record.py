import dataclasses
import json
import os
import sys
import time

import pytest
import torch

from stoker import errors
from stoker.errors import StokerError, install_excepthook, report_failure
from stoker.records import RecordConfig, read_metrics, read_record, start_run
from stoker.records import run as run_module
from stoker.records.listing import effective_status


@dataclasses.dataclass
class TrainConfig:
    lr: float = 3e-4
    layers: tuple[int, ...] = (64, 64)
    out: object = None


def _config(tmp_path, **kw):
    return RecordConfig(directory=tmp_path / "run", save_code=False, flush_seconds=0.01, **kw)


def test_record_holds_what_produced_the_run(tmp_path):
    run = start_run(
        _config(tmp_path),
        user_config=TrainConfig(out=tmp_path),
        settings={"precision": "bf16"},
        seeds={"torch": 1},
        world_size=1,
    )
    run.log({"loss": torch.tensor(0.5)}, step=7)
    run.finish()
    record = read_record(tmp_path / "run")
    assert record["status"] == "finished" and record["ended"] >= record["started"]
    assert record["config"] == {"lr": 3e-4, "layers": [64, 64], "out": str(tmp_path)}
    assert record["settings"] == {"precision": "bf16"} and record["seeds"] == {"torch": 1}
    assert record["command"]["argv"] == sys.argv
    assert record["versions"]["torch"] == torch.__version__
    assert record["packages"]["torch"] == torch.__version__.split("+")[0] or record["packages"]
    assert record["host"]["cpu"] and record["host"]["hostname"]
    assert record["summary"]["steps"] == 7 and record["summary"]["last"]["loss"] == 0.5
    assert read_metrics(tmp_path / "run" / "metrics.jsonl")[0]["loss"] == 0.5


def test_exception_in_with_block_records_failed_with_the_error(tmp_path):
    with pytest.raises(ValueError), start_run(_config(tmp_path)):
        raise ValueError("lr must be positive, got -1")
    record = read_record(tmp_path / "run")
    assert record["status"] == "failed"
    assert record["error"]["type"] == "ValueError"
    assert "lr must be positive" in record["error"]["message"]
    assert "Traceback" in record["error"]["traceback"]


def test_console_output_is_copied(tmp_path, capsys):
    run = start_run(_config(tmp_path))
    print("step 1 loss 2.0")
    print("a warning", file=sys.stderr)
    run.finish()
    print("after the run")
    text = (tmp_path / "run" / "console.log").read_text()
    assert "step 1 loss 2.0" in text and "a warning" in text and "after the run" not in text
    assert "step 1 loss 2.0" in capsys.readouterr().out  # still on the terminal


def test_hooks_are_removed_after_finish(tmp_path):
    run = start_run(_config(tmp_path))
    run.finish()
    report_failure(RuntimeError("a later error of the same process"))
    assert read_record(tmp_path / "run")["status"] == "finished"
    assert run.end not in [ref() for ref in errors._listeners]


def test_an_error_the_one_line_hook_prints_is_still_recorded(tmp_path):
    # The one-line hook may be installed before or after the run's: either way it is heard.
    run = start_run(_config(tmp_path))
    install_excepthook()
    exc = StokerError("batch_size=0; use 1 or more")
    sys.excepthook(type(exc), exc, None)
    record = read_record(tmp_path / "run")
    assert record["status"] == "failed" and record["error"]["type"] == "StokerError"
    assert run._done


def test_uncaught_exception_hook_records_failed(tmp_path):
    run = start_run(_config(tmp_path))
    try:
        raise RuntimeError("boom")
    except RuntimeError as exc:
        sys.excepthook(type(exc), exc, exc.__traceback__)  # what the interpreter does
    assert read_record(tmp_path / "run")["status"] == "failed"
    assert run._done


def test_a_forked_child_writes_nothing(tmp_path):
    run = start_run(_config(tmp_path))
    run.log({"loss": 1.0}, step=1)
    pid = os.fork()
    if pid == 0:  # the child, e.g. a DataLoader worker: everything it does must stay here
        code = 0
        try:
            print("printed by the child")
            run.log({"loss": 2.0}, step=2)
            run.update(note="from the child")
            run.finish("failed", "the child's error")
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert read_record(tmp_path / "run")["status"] == "running"
    assert "printed by the child" not in (tmp_path / "run" / "console.log").read_text()
    run.finish()
    record = read_record(tmp_path / "run")
    assert record["status"] == "finished" and "note" not in record
    assert [m["loss"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1.0]


def test_non_main_rank_writes_nothing(tmp_path):
    run = start_run(_config(tmp_path), rank=1)
    run.log({"loss": 1.0}, step=1)
    run.finish()
    assert not run.enabled and not (tmp_path / "run").exists()
    assert run.dir == tmp_path / "run"


def test_restart_into_the_same_directory_is_a_new_attempt(tmp_path):
    start_run(_config(tmp_path), user_config={"lr": 1}).finish("killed", "SIGKILL")
    run = start_run(_config(tmp_path), user_config={"lr": 2})
    record = read_record(tmp_path / "run")
    assert len(record["attempts"]) == 2 and record["status"] == "running"
    assert record["config"] == {"lr": 2}  # the record describes the attempt that is running
    run.finish()


def test_dead_process_shows_as_killed(tmp_path):
    run = start_run(_config(tmp_path))
    record = read_record(tmp_path / "run")
    assert effective_status(record) == "running"  # this process is alive
    record["pid"] = 2**22 + 12345  # a pid that does not exist
    assert effective_status(record) == "killed"
    other_host = dict(record, host={"hostname": "elsewhere"}, heartbeat="2000-01-01T00:00:00+00:00")
    assert effective_status(other_host) == "killed"  # stale heartbeat
    run.finish()


def test_default_directory_is_runs_utc_time_name(tmp_path, monkeypatch):
    monkeypatch.delenv("STOKER_RUN_DIR", raising=False)
    monkeypatch.delenv("STOKER_RUNS_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    run = start_run(RecordConfig(name="my run", save_code=False, tee_console=False))
    run.finish()
    assert run.dir.parent == tmp_path / "runs" or run.dir.parent.resolve() == tmp_path / "runs"
    _, _, name = run.id.partition("-")[2].partition("-")
    assert run.id[:8].isdigit() and name == "my-run"
    assert json.loads((run.dir / "record.json").read_text())["name"] == "my run"


def test_recording_never_blocks_the_loop_for_more_than_a_few_ms(tmp_path):
    # A loop of ~1 ms steps; metrics flushed every 20 ms and the record rewritten every 50 ms
    # (far more often than the defaults) by the background thread. The loop thread only
    # queues; what it can still wait for is the GIL while that thread runs Python.
    run = start_run(
        RecordConfig(
            directory=tmp_path / "run", save_code=False, flush_seconds=0.02, heartbeat_seconds=0.05
        )
    )
    a = torch.randn(96, 96)
    loss = torch.tensor(1.0)
    times = []
    for step in range(400):
        for _ in range(4):
            a @ a  # the "training step"
        t0 = time.perf_counter()
        run.log({"loss": loss, "lr": 1e-3}, step=step)
        times.append(time.perf_counter() - t0)
    run.finish()
    times.sort()
    assert times[len(times) // 2] < 100e-6, f"median log() {times[200] * 1e6:.0f} us"
    assert times[int(len(times) * 0.99)] < 5e-3, f"p99 log() {times[396] * 1e3:.2f} ms"
    assert read_record(tmp_path / "run")["summary"]["steps"] == 399


def test_git_state_is_recorded_from_the_script_repository(tmp_path, monkeypatch):
    import subprocess

    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "train.py").write_text("print(1)\n")
    monkeypatch.setattr(run_module, "_script", lambda: repo / "train.py")
    run = start_run(RecordConfig(directory=repo / "runs" / "r", tee_console=False))
    run.finish()
    record = read_record(repo / "runs" / "r")
    assert record["git"]["repo"] == str(repo) and record["git"]["dirty"]
    assert record["git"]["untracked_included"] == ["train.py"]
    assert "+print(1)" in (repo / "runs" / "r" / "code.patch").read_text()
    assert record["command"]["script"] == str(repo / "train.py")


def test_find_run_by_unique_part(tmp_path):
    from stoker.errors import StokerError
    from stoker.records import find_run

    for rid in ("20250101-000000-alpha", "20250102-000000-beta", "20250103-000000-beta"):
        (tmp_path / rid).mkdir()
        (tmp_path / rid / "record.json").write_text(json.dumps({"id": rid, "started": rid}))
    assert find_run("alpha", tmp_path).name == "20250101-000000-alpha"
    assert find_run("0102", tmp_path).name == "20250102-000000-beta"
    assert find_run("-1", tmp_path).name == "20250103-000000-beta"
    with pytest.raises(StokerError, match="'beta' matches 2 runs"):
        find_run("beta", tmp_path)
    with pytest.raises(StokerError, match=r"no run 'gamma'.*recent ones"):
        find_run("gamma", tmp_path)


def test_latest_run_of_a_script_by_its_name(tmp_path):
    from stoker.errors import StokerError
    from stoker.records.listing import latest_run

    runs = [("20250101-000000-train", "train"), ("20250102-000000-train-2", "train")]
    for rid, name in [*runs, ("20250103-000000-bench", "bench")]:
        (tmp_path / rid).mkdir()
        record = {"id": rid, "name": name, "started": rid}
        (tmp_path / rid / "record.json").write_text(json.dumps(record))
    assert latest_run("train", tmp_path).name == "20250102-000000-train-2"
    with pytest.raises(StokerError, match="no eval run under"):
        latest_run("eval", tmp_path)


def test_a_full_disk_is_recorded_as_incomplete_metrics(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").symlink_to("/dev/full")  # every write: ENOSPC
    run = start_run(_config(tmp_path, tee_console=False))
    for step in range(5):
        run.log({"loss": torch.tensor(1.0)}, step=step)
    run.finish()
    record = read_record(run_dir)
    assert record["status"] == "finished"
    assert record["summary"]["lines_lost"] == 5
    assert "No space left on device" in record["summary"]["metrics_error"]
    assert capsys.readouterr().err.count("stoker: warning: metrics could not be written") == 1


def test_a_final_record_that_cannot_be_written_says_so_and_keeps_the_previous_one(tmp_path, capsys):
    run = start_run(_config(tmp_path, tee_console=False))
    before = (run.dir / "record.json").read_text()
    # The temporary file write_record writes beside record.json lands on a full "disk".
    (run.dir / f".record.json.{os.getpid()}.tmp").symlink_to("/dev/full")
    run.finish()
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"stoker: warning: could not write {run.dir / 'record.json'}")
    assert "No space left on device" in err and "'finished'" in err
    assert (run.dir / "record.json").read_text() == before  # the earlier record, intact
    assert json.loads(before)["status"] == "running"
    assert not list(run.dir.glob(".record.json.*"))  # no temporary file left behind


_HOLDER = """
import sys, time
from stoker.records import RecordConfig, start_run
start_run(RecordConfig(directory=sys.argv[1], save_code=False, tee_console=False))
print("started", flush=True)
time.sleep(600)
"""


def test_a_second_live_process_is_refused_the_run_directory_a_dead_one_is_not(tmp_path):
    import signal
    import subprocess

    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(run_dir)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "started"
        with pytest.raises(StokerError) as refused:
            start_run(_config(tmp_path, tee_console=False))
        message = str(refused.value)
        assert f"{run_dir} is in use by process {holder.pid}" in message
        assert "\n" not in message and "another directory" in message
        assert json.loads((run_dir / "record.json").read_text())["pid"] == holder.pid  # untouched
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    run = start_run(_config(tmp_path, tee_console=False))  # a dead owner does not block
    run.finish()
    assert read_record(run_dir)["status"] == "finished"


def test_printing_goes_on_when_console_log_cannot_be_written(tmp_path, capsys):
    from stoker.records.console import ConsoleTee

    (tmp_path / "console.log").symlink_to("/dev/full")  # every write: ENOSPC
    tee = ConsoleTee(tmp_path / "console.log")
    try:
        for i in range(3):
            print(f"step {i}")  # the loop's own prints must not raise
    finally:
        tee.close()
    out, err = capsys.readouterr()
    assert out == "step 0\nstep 1\nstep 2\n"
    assert err.count("\n") == 1, err
    assert err.startswith("stoker: warning: console output could not be copied to ")
    assert "No space left on device" in err
