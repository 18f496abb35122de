"""A full disk or a permission error while saving leaves the previous checkpoint loadable."""

import errno
import os

import pytest
import torch

from stoker.checkpoint import (
    CheckpointConfig,
    Checkpointer,
    CheckpointError,
    CheckpointWarning,
    _files,
    latest_valid,
    load,
    save,
)


def _full_disk_after(monkeypatch, budget):
    """Make checkpoint writes fail with ENOSPC once ``budget`` bytes are written."""
    real_open = open
    written = [0]

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            n = len(memoryview(data))
            if written[0] + n > budget:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            written[0] += n
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return Full(f) if "w" in mode else f

    monkeypatch.setattr(_files, "open", fake_open, raising=False)


def _state(value):
    model = torch.nn.Linear(64, 64)
    with torch.no_grad():
        model.weight.fill_(value)
    return {"model": model, "step": value}


def test_full_disk_mid_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    save(tmp_path / "step-1", _state(1))
    _full_disk_after(monkeypatch, budget=5000)  # dies inside the weights file
    with pytest.raises(CheckpointError, match=r"No space left on device.*disk full.*untouched"):
        save(tmp_path / "step-2", _state(2))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1"]  # no partial leftovers
    state = _state(0)
    load(latest_valid(tmp_path), state)
    assert state["step"] == 1 and state["model"].weight.eq(1).all()


def test_permission_error_at_rename_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    save(tmp_path / "step-1", _state(1))

    def denied(src, dst):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dst))

    monkeypatch.setattr(os, "rename", denied)
    with pytest.raises(CheckpointError, match=r"Permission denied.*no permission"):
        save(tmp_path / "step-2", _state(2))
    monkeypatch.undo()
    assert latest_valid(tmp_path) == tmp_path / "step-1"
    assert not (tmp_path / ".tmp-step-2").exists()


def test_policy_warn_continues_with_one_warning(tmp_path, monkeypatch):
    ckpt = Checkpointer(tmp_path, CheckpointConfig(every_steps=1, on_error="warn"))
    state = _state(1)
    assert ckpt.maybe_save(1, state)
    _full_disk_after(monkeypatch, budget=0)
    with pytest.warns(CheckpointWarning) as caught:
        assert not ckpt.maybe_save(2, state)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "step-00000002" in message and "training continues" in message
    assert "step-00000001" in message  # says which checkpoint is still good
    assert "\n" not in message
    monkeypatch.undo()
    assert ckpt.failures == 1
    assert ckpt.maybe_save(3, state)  # and later saves work again
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["step-00000001", "step-00000003"]


def test_policy_raise_stops_with_one_clear_error(tmp_path, monkeypatch):
    ckpt = Checkpointer(tmp_path, CheckpointConfig(every_steps=1, on_error="raise"))
    state = _state(1)
    ckpt.maybe_save(1, state)
    _full_disk_after(monkeypatch, budget=0)
    with pytest.raises(CheckpointError) as info:
        ckpt.maybe_save(2, state)
    assert "\n" not in str(info.value) and "disk full" in str(info.value)
    monkeypatch.undo()
    assert latest_valid(tmp_path).name == "step-00000001"


def test_async_save_failure_is_reported_at_the_next_call(tmp_path, monkeypatch):
    ckpt = Checkpointer(tmp_path, CheckpointConfig(every_steps=1, async_save=True))
    state = _state(1)
    ckpt.maybe_save(1, state)
    ckpt.wait()
    _full_disk_after(monkeypatch, budget=0)
    ckpt.maybe_save(2, state)
    ckpt._thread.join()  # let the background write fail
    monkeypatch.undo()
    with pytest.warns(CheckpointWarning, match="could not save checkpoint .*step-00000002"):
        ckpt.maybe_save(3, state)
    ckpt.close()
    assert latest_valid(tmp_path).name == "step-00000003"
