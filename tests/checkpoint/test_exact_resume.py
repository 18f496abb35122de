"""SIGKILL at a random step, resume, and end bitwise identical to an uninterrupted run."""

from pathlib import Path

import pytest

from stoker.checkpoint.check_resume import CheckResumeConfig, check_resume

JOB = str(Path(__file__).with_name("resume_job.py"))


def _check(tmp_path, args, **config):
    return check_resume(
        JOB, args, CheckResumeConfig(workdir=tmp_path, **config), echo=lambda _: None
    )


def test_sigkill_and_resume_is_bitwise_exact(tmp_path):
    result = _check(tmp_path, ["--steps", "24", "--every", "5", "--fast-start"], kills=1, seed=3)
    assert result.kill_steps and 5 < result.kill_steps[0] < 24  # after a checkpoint existed
    assert result.identical, result.differences
    assert result.tensors_compared > 10
    assert result.first_loss_difference is None


@pytest.mark.slow
def test_the_check_catches_a_resume_that_replays_data(tmp_path):
    # The job "forgets" its sampler position: after the resume it sees the wrong batches.
    args = ["--steps", "24", "--every", "5", "--forget-sampler", "--fast-start"]
    result = _check(tmp_path, args, seed=3)
    assert not result.identical
    assert any("model.safetensors" in d for d in result.differences)
    assert result.first_loss_difference is not None
    assert result.first_loss_difference > 5  # the first resumed step


@pytest.mark.slow
def test_async_save_resume_is_bitwise_exact(tmp_path):
    result = _check(tmp_path, ["--steps", "24", "--every", "4", "--async-save"], kills=2, seed=5)
    assert result.identical, result.differences


@pytest.mark.slow
def test_two_process_ddp_sigkill_and_resume_is_bitwise_exact(tmp_path):
    result = _check(tmp_path, ["--steps", "20", "--every", "4"], kills=1, seed=11, nproc=2)
    assert result.kill_steps[0] > 4
    assert result.identical, result.differences
    ranks = {p.name for p in (result.resumed_dir / "checkpoints").glob("*/rank-*.json")}
    assert ranks == {"rank-00000.json", "rank-00001.json"}


@pytest.mark.slow
def test_two_process_ddp_async_save_resume_is_bitwise_exact(tmp_path):
    # Background saves coordinate the ranks on their own gloo group from a helper thread.
    args = ["--steps", "16", "--every", "3", "--async-save", "--fast-start"]
    result = _check(tmp_path, args, kills=1, seed=0, nproc=2)
    assert result.kill_steps == [14]  # after several completed background saves
    assert result.identical, result.differences


@pytest.mark.slow
def test_ten_random_kill_points_all_resume_exactly(tmp_path):
    result = _check(tmp_path, ["--steps", "60", "--every", "4"], kills=10, seed=2024)
    assert len(result.kill_steps) == 10
    assert result.identical, result.differences
    assert result.first_loss_difference is None  # every step after every resume matched
