"""End to end: real runs of a script in a git repository, then `stoker runs`, diff, reproduce."""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from stoker.cli import reproduce as reproduce_cli
from stoker.cli import runs as runs_cli
from stoker.records import find_run, list_runs, read_record, reproduce

SCRIPT = Path(__file__).with_name("tiny_train.py")
GIT_USER = ["-c", "user.name=t", "-c", "user.email=t@example.com"]


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *GIT_USER, *args], check=True, capture_output=True)


def _start(repo, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("STOKER_RUN_DIR", "STOKER_RUNS_DIR")}
    return subprocess.Popen(
        [sys.executable, "tiny_train.py", *args],
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _cli(module, argv, capsys):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    code = module.main(parser.parse_args(argv))
    return code, capsys.readouterr().out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Four runs: A finished, B finished with a code edit and another lr, C failed, D killed."""
    repo = tmp_path_factory.mktemp("project")
    shutil.copy(SCRIPT, repo / "tiny_train.py")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "first")

    a = _start(repo, "--lr", "0.05")
    d = _start(repo, "--hang")
    assert a.wait(timeout=120) == 0, a.stderr.read()
    # Edit the code (uncommitted) before B and C start.
    text = (repo / "tiny_train.py").read_text()
    edited = text.replace("lr=args.lr)", "lr=args.lr, momentum=0.5)")
    assert edited != text
    (repo / "tiny_train.py").write_text(edited)
    b = _start(repo, "--lr", "0.1")
    c = _start(repo, "--fail")
    assert b.wait(timeout=120) == 0, b.stderr.read()
    assert c.wait(timeout=120) == 1
    assert d.stdout.readline().startswith("final loss")
    assert d.stdout.readline() == "hanging\n"
    d.send_signal(signal.SIGKILL)
    d.wait(timeout=30)
    found = {r.record["command"]["script_args"][-1]: r for r in list_runs(repo / "runs")}
    return repo, found


def test_statuses_including_an_inferred_kill(runs):
    _, found = runs
    assert found["0.05"].status == "finished"
    assert found["0.1"].status == "finished"
    assert found["--fail"].status == "failed"
    assert found["--hang"].status == "killed"
    assert found["--hang"].record["status"] == "running"  # the dead process wrote nothing
    error = found["--fail"].record["error"]
    assert error["type"] == "RuntimeError" and "failed on purpose" in error["message"]
    assert found["0.05"].steps == 20 and found["0.05"].last_loss > 0


def test_runs_table(runs, capsys, monkeypatch):
    repo, found = runs
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.chdir(repo)  # `stoker runs` looks in ./runs
    monkeypatch.delenv("STOKER_RUNS_DIR", raising=False)
    code, out = _cli(runs_cli, [], capsys)
    assert code == 0
    for info in found.values():
        assert info.id in out
    assert "finished" in out and "failed" in out and "killed?" in out
    assert f"{found['0.05'].last_loss:.4g}" in out


def test_runs_show(runs, capsys, monkeypatch):
    repo, found = runs
    monkeypatch.setenv("COLUMNS", "200")
    code, out = _cli(runs_cli, ["--root", str(repo / "runs"), "show", found["0.1"].id], capsys)
    assert code == 0 and "config.lr" in out and "0.1" in out and "dirty: code.patch" in out


def test_diff_shows_the_changed_config_value_and_line_of_code(runs, capsys, monkeypatch):
    repo, found = runs
    monkeypatch.setenv("COLUMNS", "200")
    argv = ["--root", str(repo / "runs"), "diff", found["0.05"].id, found["0.1"].id]
    code, out = _cli(runs_cli, argv, capsys)
    assert code == 0
    assert "lr: 0.05 -> 0.1" in out
    assert "-opt = torch.optim.SGD(model.parameters(), lr=args.lr)" in out
    assert "+opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.5)" in out
    assert "packages" not in out  # same environment


def test_reproduce_a_finished_run_gives_the_exact_final_loss(runs, capsys):
    repo, found = runs
    original = found["0.05"]
    # The working tree has moved on (B's edit); reproduce must use A's code, not today's.
    result = reproduce(original.dir, quiet=True, echo=lambda _: None)
    assert result.returncode == 0
    loss = next(m for m in result.metrics if m.key == "loss")
    assert loss.original == loss.reproduced == original.last_loss
    assert loss.max_abs_diff == 0.0 and loss.steps_compared == 20
    assert result.matches
    again = read_record(result.reproduction)
    assert again["git"]["revision"] == original.record["git"]["revision"]
    assert (
        "worktree"
        not in subprocess.run(
            ["git", "-C", str(repo), "worktree", "list"], capture_output=True, text=True
        ).stdout.split("\n", 1)[-1]
    )  # the temporary worktree is gone


def test_reproduce_cli_reports_a_difference(runs, capsys, monkeypatch, tmp_path):
    _, found = runs
    # A copy of B (edited code, lr 0.1) whose recorded final loss is off by 1e-6.
    copy = tmp_path / "b-copy"
    shutil.copytree(found["0.1"].dir, copy)
    lines = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
    lines[-1]["loss"] += 1e-6
    (copy / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    monkeypatch.setenv("COLUMNS", "200")
    code, out = _cli(reproduce_cli, [str(copy)], capsys)
    assert code == 1 and "NOT reproduced" in out and "1e-06" in out


def test_find_run_by_part_of_the_id_or_position(runs):
    repo, found = runs
    newest = max(found.values(), key=lambda r: (r.record["started"], r.id))
    assert find_run("-1", repo / "runs") == newest.dir
    assert find_run(str(found["0.05"].dir)) == found["0.05"].dir
    assert find_run(found["0.05"].id, repo / "runs") == found["0.05"].dir


@pytest.mark.slow
def test_sigterm_is_recorded_as_killed_by_the_process_itself(tmp_path):
    shutil.copy(SCRIPT, tmp_path / "tiny_train.py")
    proc = _start(tmp_path, "--hang")
    assert proc.stdout.readline().startswith("final loss")
    assert proc.stdout.readline() == "hanging\n"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == -signal.SIGTERM  # still dies of the signal
    (run,) = list_runs(tmp_path / "runs")
    assert run.record["status"] == "killed"  # written by the handler, not inferred
    assert run.record["error"]["message"] == "terminated by SIGTERM"
    assert run.record["git"] is None  # not in a repository: recorded as such


def test_reproduce_leaves_the_meters_speed_and_memory_out(tmp_path):
    from stoker.records import MACHINE_METRICS, compare_metrics

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    line = {"step": 25, "time": 1.0, "loss": 0.5}
    a.write_text(json.dumps({**line, "mfu": 0.31, "step_s_p50": 0.2}) + "\n")
    b.write_text(json.dumps({**line, "mfu": 0.12, "step_s_p50": 0.9}) + "\n")
    diffs = compare_metrics(a, b)
    assert [d.key for d in diffs] == ["loss"] and diffs[0].max_abs_diff == 0.0
    assert {"mfu", "step_s_p50", "tokens_per_s"} <= MACHINE_METRICS
