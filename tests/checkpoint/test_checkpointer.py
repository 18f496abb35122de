import pytest
import torch

from stoker.checkpoint import CheckpointConfig, Checkpointer, list_checkpoints, load
from stoker.checkpoint import checkpointer as checkpointer_module
from stoker.errors import StokerError


def _state():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return {"model": model, "optimizer": opt}


def _step(state):
    state["model"](torch.randn(2, 8)).sum().backward()
    state["optimizer"].step()
    state["optimizer"].zero_grad()


def test_saves_every_n_steps_and_keeps_the_last_k(tmp_path):
    ckpt = Checkpointer(tmp_path, CheckpointConfig(every_steps=3, keep_last=2))
    state = _state()
    saved = []
    for step in range(1, 11):
        _step(state)
        if ckpt.maybe_save(step, state):
            saved.append(step)
    assert saved == [3, 6, 9]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [6, 9]
    assert ckpt.latest.name == "step-00000009"


def test_time_trigger(tmp_path, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(checkpointer_module.time, "monotonic", lambda: now[0])
    ckpt = Checkpointer(tmp_path, CheckpointConfig(every_minutes=5, keep_last=None))
    state = _state()
    assert not ckpt.maybe_save(1, state)
    now[0] += 5 * 60
    assert ckpt.maybe_save(2, state)
    now[0] += 60
    assert not ckpt.maybe_save(3, state)
    now[0] += 4 * 60
    assert ckpt.maybe_save(4, state)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 4]


def test_resume_returns_the_step_and_restores_state(tmp_path):
    state = _state()
    ckpt = Checkpointer(tmp_path, CheckpointConfig(every_steps=2))
    for step in range(1, 5):
        _step(state)
        ckpt.maybe_save(step, state)
    fresh = {"model": torch.nn.Linear(8, 8), "optimizer": None}
    fresh["optimizer"] = torch.optim.AdamW(fresh["model"].parameters(), lr=1e-2)
    assert Checkpointer(tmp_path).resume(fresh) == 4
    assert torch.equal(fresh["model"].weight, state["model"].weight)
    assert Checkpointer(tmp_path / "empty").resume(fresh) is None


def test_async_save_writes_the_state_of_its_step_not_later_ones(tmp_path):
    state = _state()
    ckpt = Checkpointer(tmp_path, CheckpointConfig(every_steps=1, async_save=True))
    _step(state)
    expected = {k: v.clone() for k, v in state["model"].state_dict().items()}
    expected_moment = state["optimizer"].state_dict()["state"][0]["exp_avg"].clone()
    ckpt.maybe_save(1, state)
    for _ in range(3):  # training goes on (in place updates) while the thread writes
        _step(state)
    ckpt.close()
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.AdamW(model.parameters())
    load(tmp_path / "step-00000001", {"model": model, "optimizer": opt})
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], expected_moment)


def test_same_step_is_not_saved_twice(tmp_path):
    ckpt = Checkpointer(tmp_path, CheckpointConfig(every_steps=1))
    state = _state()
    assert ckpt.maybe_save(1, state)
    assert not ckpt.maybe_save(1, state)  # e.g. called per micro-batch
    assert ckpt.save(1, state) == tmp_path / "step-00000001"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_steps": 0}, "every_steps=0"),
        ({"every_minutes": -1}, "every_minutes=-1"),
        ({"keep_last": 0}, "keep_last=0"),
        ({"on_error": "ignore"}, r"on_error='ignore'; choose one of \('warn', 'raise'\)"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(StokerError, match=match):
        CheckpointConfig(**kwargs)
