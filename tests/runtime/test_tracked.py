"""prepare(state=...): the user's own state is checkpointed and restored on resume."""

import pytest
import torch

from stoker import Stoker, StokerError, Variables
from stoker.checkpoint import CheckpointMismatch
from stoker.records import RecordConfig
from stoker.runtime.tracked import TrackedState


class Ema(torch.nn.Module):
    """A stateful object of the user's (here a module: state_dict / load_state_dict)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("value", torch.zeros(3))


def _run(tmp_path, name, state, resume="never", steps=3):
    stoker = Stoker(
        device="cpu",
        precision="fp32",
        seed=0,
        record=RecordConfig(directory=tmp_path / name, tee_console=False),
        resume=resume,
    )
    model = torch.nn.Linear(3, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = stoker.prepare(model, optimizer, state=state)
    for _ in range(steps):
        out = model(torch.randn(2, 3))
        stoker.backward(out.square().mean())
        state["progress"]["epoch"] += 1
        state["progress"]["hidden"] = (out.detach(), out.detach() * 2)
        state["ema"].value.add_(1.0)
        optimizer.step()
        optimizer.zero_grad()
    stoker.close()
    return stoker


def test_dicts_are_restored_in_place_and_objects_through_load_state_dict(tmp_path):
    first = {"progress": {"epoch": 0, "lr": 0.5, "best": float("inf"), "hidden": None}}
    first["ema"] = Ema()
    _run(tmp_path, "a", first)
    progress = {"epoch": -1}
    state = {"progress": progress, "ema": Ema()}
    stoker = _run(tmp_path, "b", state, resume=str(tmp_path / "a"), steps=0)
    assert stoker.resumed_from == 3
    assert state["progress"] is progress  # the same dict, its contents replaced
    assert progress["epoch"] == 3 and progress["lr"] == 0.5 and progress["best"] == float("inf")
    h, c = progress["hidden"]
    assert torch.equal(h, first["progress"]["hidden"][0]) and torch.equal(c, 2 * h)
    assert torch.equal(state["ema"].value, torch.full((3,), 3.0))


def test_state_values_must_be_dicts_or_stateful():
    stoker = Stoker(device="cpu", precision="fp32", record=False)
    with pytest.raises(StokerError, match=r"\{'lr': 'float'\} cannot be checkpointed"):
        stoker.prepare(torch.nn.Linear(2, 2), state={"lr": 0.1})


def test_a_checkpoint_without_a_tracked_name_stops_the_resume(tmp_path):
    _run(tmp_path, "a", {"progress": {"epoch": 0}, "ema": Ema()})
    state = {"progress": {"epoch": 0}, "ema": Ema(), "other": {"x": 1}}
    with pytest.raises(CheckpointMismatch, match=r"the user state has no \['other'\]"):
        _run(tmp_path, "b", state, resume=str(tmp_path / "a"), steps=0)
    assert state["progress"] == {"epoch": 0}  # nothing was loaded


def test_a_checkpoint_without_a_tracked_name_is_refused_before_loading():
    tracked = TrackedState({"progress": {"epoch": 0}, "other": {"x": 1}}, torch.device("cpu"))
    with pytest.raises(CheckpointMismatch, match=r"no \['other'\] \(it holds \['progress'\]\)"):
        tracked.check_state_dict({"progress": {"epoch": 3}})


def test_variables_restore_names_of_a_namespace_and_nothing_else(tmp_path):
    scope = {"epoch": 0, "lr": 0.5, "hidden": None, "untracked": "kept"}

    def run(name, resume="never", steps=3):
        stoker = Stoker(
            device="cpu",
            precision="fp32",
            seed=0,
            record=RecordConfig(directory=tmp_path / name, tee_console=False),
            resume=resume,
        )
        model = torch.nn.Linear(3, 3)
        loop = Variables(scope, "epoch", "lr", "hidden")
        model = stoker.prepare(model, state={"loop": loop})
        for _ in range(steps):
            out = model(torch.randn(2, 3))
            stoker.backward(out.square().mean())
            scope.update(epoch=scope["epoch"] + 1, lr=scope["lr"] / 2, hidden=(out.detach(),))
            stoker.step_done()
        stoker.close()
        return stoker

    run("a")
    saved = dict(scope)
    scope.update(epoch=-1, lr=9.0, hidden=None, untracked="changed")
    assert run("b", resume=str(tmp_path / "a"), steps=0).resumed_from == 3
    assert scope["epoch"] == 3 and scope["lr"] == 0.0625
    assert torch.equal(scope["hidden"][0], saved["hidden"][0])
    assert scope["untracked"] == "changed"  # only the named variables are assigned


def test_variables_must_exist_when_named():
    with pytest.raises(StokerError, match=r"\['best'\] not defined yet"):
        Variables({"epoch": 1}, "epoch", "best")
