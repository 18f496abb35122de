import json
import os

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from stoker.checkpoint import CheckpointError, load, read_manifest, save, verify


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.norm = nn.LayerNorm(6)
        self.out = nn.Linear(6, 11)
        self.out.weight = self.emb.weight  # tied, as in most language models
        self.register_buffer("seen", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        self.seen += x.numel()
        return self.out(self.norm(self.emb(x)))


def _trained(steps=3, seed=0):
    torch.manual_seed(seed)
    model = Tied()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=20)
    for _ in range(steps):
        model(torch.tensor([[1, 2, 3]])).sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched


def _fresh():
    return _trained(steps=0, seed=99)


def test_round_trip_restores_weights_optimizer_scheduler_and_data(tmp_path):
    model, opt, sched = _trained()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    extras = {"epoch": 2, "betas": (0.9, 0.95), "ids": torch.arange(4), "note": None}
    path = save(
        tmp_path / "step-00000003",
        {"model": model, "opt": opt, "sched": sched, "scaler": scaler, "extras": extras},
    )
    assert read_manifest(path).step == 3
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())

    model2, opt2, sched2 = _fresh()
    scaler2 = torch.amp.GradScaler("cpu", init_scale=2.0)
    state = {"model": model2, "opt": opt2, "sched": sched2, "scaler": scaler2, "extras": None}
    rest = load(path, state)
    assert rest == {}
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert model2.out.weight is model2.emb.weight  # tying survives (loaded in place)
    assert sched2.state_dict() == sched.state_dict()
    assert scaler2.get_scale() == 1024.0
    for s1, s2 in zip(opt.state.values(), opt2.state.values(), strict=True):
        assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert state["extras"]["betas"] == (0.9, 0.95) and torch.equal(
        state["extras"]["ids"], torch.arange(4)
    )
    # Both continue identically.
    for m, o in ((model, opt), (model2, opt2)):
        m(torch.tensor([[4, 5]])).sum().backward()
        o.step()
    assert torch.equal(model.emb.weight, model2.emb.weight)


def test_weights_file_is_plain_safetensors_with_tied_weight_stored_once(tmp_path):
    model, _, _ = _trained()
    path = save(tmp_path / "ckpt", {"model": model})
    weights = load_file(path / "model.safetensors")
    assert "emb.weight" in weights and "out.weight" not in weights  # alias in metadata
    assert torch.equal(weights["norm.weight"], model.norm.weight)


def test_checkpoint_entries_not_asked_for_are_returned(tmp_path):
    model, opt, _ = _trained()
    path = save(tmp_path / "c", {"model": model, "opt": opt, "step": 7})
    rest = load(path, {"model": _fresh()[0]})
    assert rest.keys() == {"opt", "step"} and rest["step"] == 7
    assert "state" in rest["opt"] and "param_groups" in rest["opt"]


def test_strict_load_names_missing_keys_and_mismatched_modules(tmp_path):
    model, _, _ = _trained()
    path = save(tmp_path / "c", {"model": model})
    with pytest.raises(CheckpointError, match=r"has no \['optimizer'\].*holds \['model'\]"):
        load(path, {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=1)})
    with pytest.raises(CheckpointError, match="does not match the model: missing"):
        load(path, {"model": nn.Sequential(Tied(), nn.Linear(1, 1))})
    wider = Tied()
    wider.norm = nn.LayerNorm(7)
    with pytest.raises(CheckpointError, match=r"does not fit the model .*norm\.weight"):
        load(path, {"model": wider}, strict=False)


def test_wrapped_modules_are_saved_unwrapped(tmp_path):
    from stoker.runtime.model import PreparedModel

    model, _, _ = _trained()
    # torch.compile's and stoker's wrappers are taken off by type (DDP too, see the runtime).
    wrapped = torch.compile(PreparedModel(model, model, autocast_dtype=None, device_type="cpu"))
    path = save(tmp_path / "c", {"model": wrapped})
    assert "emb.weight" in load_file(path / "model.safetensors")
    fresh = _fresh()[0]
    load(path, {"model": torch.compile(fresh)})
    assert torch.equal(fresh.norm.bias, model.norm.bias)


def test_a_child_named_module_is_the_users_own(tmp_path):
    model, _, _ = _trained()

    class Outer(nn.Module):  # not a wrapper: its child just happens to be called `module`
        def __init__(self, module):
            super().__init__()
            self.module = module
            self.head = nn.Linear(2, 2)

    outer = Outer(model)
    path = save(tmp_path / "c", {"model": outer})
    assert set(load_file(path / "model.safetensors")) >= {"module.emb.weight", "head.weight"}
    fresh = Outer(_fresh()[0])
    load(path, {"model": fresh})
    assert torch.equal(fresh.head.weight, outer.head.weight)


def test_saving_over_an_existing_checkpoint_replaces_it_atomically(tmp_path):
    model, _, _ = _trained()
    save(tmp_path / "c", {"model": model, "step": 1})
    save(tmp_path / "c", {"model": model, "step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    assert load(tmp_path / "c", {})["step"] == 2


def test_manifest_lists_every_file_with_its_hash(tmp_path):
    model, opt, _ = _trained()
    path = save(tmp_path / "step-5", {"model": model, "opt": opt})
    doc = json.loads((path / "manifest.json").read_text())
    assert set(doc["files"]) == set(os.listdir(path)) - {"manifest.json"}
    assert doc["step"] == 5 and doc["world_size"] == 1
    verify(path)


def test_unsupported_state_values_fail_before_writing_anything(tmp_path):
    with pytest.raises(CheckpointError, match=r"cannot checkpoint cfg/callback"):
        save(tmp_path / "c", {"cfg": {"callback": print}})
    with pytest.raises(CheckpointError, match="keys must be strings"):
        save(tmp_path / "c", {1: 2})
    assert not (tmp_path / "c").exists()
