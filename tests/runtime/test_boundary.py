"""Loops without a prepared DataLoader or accumulate() get periodic checkpoints that resume
exactly: the RNG, the runtime's counters and the user's state are copied at the optimizer step
and written at the next backward (see stoker/runtime/boundary.py)."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from stoker import Stoker
from stoker.checkpoint import CheckpointConfig, list_checkpoints
from stoker.checkpoint.check_resume import CheckResumeConfig, check_resume

HERE = Path(__file__).parent


def _steps(stoker: Stoker) -> list[int]:
    assert stoker.run_dir is not None
    return [step for step, _ in list_checkpoints(stoker.run_dir / "checkpoints")]


def _stoker(every: int) -> Stoker:
    config = CheckpointConfig(every_steps=every, keep_last=None)
    return Stoker(device="cpu", precision="fp32", seed=0, checkpoint=config, resume="never")


def test_a_loop_feeding_its_own_tensors_checkpoints_every_n_steps():
    stoker = _stoker(every=3)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = stoker.prepare(model, optimizer)
    for _ in range(10):
        loss = model(torch.randn(8, 4)).square().mean()
        stoker.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    stoker.close()
    assert _steps(stoker) == [0, 3, 6, 9, 10]  # 0: the start, 10: the final one


def test_a_manual_update_loop_marks_its_steps_with_step_done():
    stoker = _stoker(every=4)
    model = stoker.prepare(torch.nn.Linear(4, 2))
    for _ in range(9):
        model.zero_grad()
        stoker.backward(model(torch.randn(8, 4)).square().mean())
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-0.1)
        stoker.step_done()
    stoker.close()
    assert stoker.step == 9
    assert _steps(stoker) == [0, 4, 8, 9]


def test_step_done_counts_only_the_last_micro_batch_of_a_window():
    stoker = Stoker(device="cpu", precision="fp32", accumulation_steps=2, record=False)
    model = stoker.prepare(torch.nn.Linear(4, 2))
    for _ in range(6):
        with stoker.accumulate(model):
            stoker.backward(model(torch.randn(8, 4)).square().mean())
            stoker.step_done()
    assert stoker.step == 3


def test_the_checkpoint_holds_the_rng_and_buffers_as_of_the_step():
    from stoker.checkpoint import load

    stoker = _stoker(every=2)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = stoker.prepare(model, optimizer)
    at_step: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for _ in range(3):
        x = torch.randn(8, 4)  # drawn from the global RNG before the backward that writes
        stoker.backward(F.mse_loss(model(x), torch.zeros(8, 4)))
        optimizer.step()
        optimizer.zero_grad()
        at_step[stoker.step] = (torch.get_rng_state(), model[1].running_mean.clone())
    stoker.close()
    assert _steps(stoker) == [0, 2, 3]
    rng, running_mean = at_step[2]
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    torch.manual_seed(123)
    assert stoker.run_dir is not None
    load(stoker.run_dir / "checkpoints" / "step-00000002", {"model": fresh}, strict=False)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(fresh[1].running_mean, running_mean)


def _check(tmp_path: Path, job: str, args: list[str], kills: int, seed: int):
    config = CheckResumeConfig(workdir=tmp_path, kills=kills, seed=seed, timeout_s=240)
    return check_resume(str(HERE / job), args, config, echo=lambda _: None)


@pytest.mark.slow
def test_word_language_model_lstm_killed_and_resumed_is_bitwise_exact(tmp_path):
    # Hand-sliced [seq, batch] data, a carried hidden state, manual SGD, lr / 4 on a plateau:
    # 20 steps an epoch, so the kills land mid-epoch and a checkpoint may fall on an epoch end.
    result = _check(tmp_path, "word_lm_job.py", ["--epochs", "3", "--every", "4"], 2, seed=7)
    assert result.final_step == 60
    assert len(result.kill_steps) == 2 and result.kill_steps[0] > 4
    assert result.identical, result.differences[:5]
    assert result.first_loss_difference is None
    assert result.tensors_compared > 10


# Both seeds slow (~14 s each on an EPYC Zen 3); test_exact_resume keeps SIGKILL exactness.
@pytest.mark.slow
@pytest.mark.parametrize("seed", [3, 8])
def test_nanogpt_style_randint_loop_killed_and_resumed_is_bitwise_exact(tmp_path, seed):
    args = ["--max-iters", "20", "--every", "3", "--eval-interval", "5"]
    result = _check(tmp_path, "randint_job.py", args, 1, seed=seed)
    assert result.final_step == 20
    assert result.kill_steps[0] > 3
    assert result.identical, result.differences[:5]
    assert result.first_loss_difference is None


def test_the_step_done_docstring_example_runs():
    import doctest

    runner = doctest.DocTestRunner()
    for test in doctest.DocTestFinder().find(Stoker.step_done, "step_done", globs={}):
        runner.run(test)
    assert runner.failures == 0 and runner.tries > 5


def test_a_save_due_only_since_the_step_is_not_written_from_moved_state(monkeypatch):
    # every_minutes elapsing between optimizer.step() and the next backward(): no copies were
    # taken at the step, and the state has moved since, so the save waits for a step.
    config = CheckpointConfig(every_minutes=1e-9, keep_last=None)
    stoker = Stoker(device="cpu", precision="fp32", checkpoint=config, resume="never")
    monkeypatch.setattr(stoker.services, "due", lambda step: False)  # "not due at the step"
    model = torch.nn.Linear(4, 2)
    model, optimizer = stoker.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    for _ in range(3):
        stoker.backward(model(torch.randn(8, 4)).square().mean())
        optimizer.step()
        optimizer.zero_grad()
    stoker.close()
    assert _steps(stoker) == [3]  # only the final one
