"""Sharded checkpoints through ``Stoker(strategy="fsdp")``: resume at the same and at another
world size continues the same trajectory, SIGKILL and resume ends bitwise equal, the export
equals the unsharded weights, and loading never unpickles.

The multi-process runs are tests/runtime/fsdp_job.py (2 processes under torchrun, gloo; 1
process without torch.distributed); every resumed run loads with pickle and torch.load patched
to raise."""

from __future__ import annotations

import contextlib
import json
import pickle
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from torch import nn

from stoker.checkpoint import CheckpointError, CheckpointMismatch
from stoker.checkpoint.sharded import export_consolidated, load_sharded, save_sharded

sys.path.insert(0, str(Path(__file__).parents[1] / "runtime"))
from fsdp_job import launch, run_job


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Any]:
    """20 steps uninterrupted, and 10 steps checkpointed, by 2 processes and by 1; the
    checkpoints of step 10 resumed 2 -> 2, 2 -> 1, 1 -> 2 (copies of the run directories)."""
    tmp = tmp_path_factory.mktemp("sharded")
    fsdp = {"strategy": "fsdp"}
    saved = {**fsdp, "steps": 10, "every": 10}
    out = run_job(
        tmp,
        [{**fsdp, "name": "1"}, {**saved, "name": "saved-1", "run_dir": str(tmp / "by1")}],
        1,
        "a",
    )
    out |= run_job(
        tmp,
        [{**fsdp, "name": "2"}, {**saved, "name": "saved-2", "run_dir": str(tmp / "by2")}],
        2,
        "b",
    )
    for name, source in (("2->2", "by2"), ("2->1", "by2"), ("1->2", "by1")):
        shutil.copytree(tmp / source, tmp / name)
    resume = {**fsdp, "every": 10, "no_pickle": True}
    out |= run_job(
        tmp,
        [{**resume, "name": n, "run_dir": str(tmp / n)} for n in ("2->2", "1->2")],
        2,
        "c",
    )
    out |= run_job(tmp, [{**resume, "name": "2->1", "run_dir": str(tmp / "2->1")}], 1, "d")
    out["dirs"] = {"2": tmp / "by2", "1": tmp / "by1"}
    return out


# The tests on `runs` launch 2-process jobs (~60 s in all): slow-marked to keep the default
# suite well under 10 minutes.
@pytest.mark.slow
@pytest.mark.parametrize("resumed", ["2->2", "2->1", "1->2"])
def test_resume_continues_the_same_trajectory(runs, resumed):
    uninterrupted = runs[resumed[0]]  # the run on as many processes as the one that saved
    assert runs[resumed]["start"] == 10 and len(runs[resumed]["losses"]) == 10
    torch.testing.assert_close(
        runs[resumed]["losses"], uninterrupted["losses"][10:], atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        runs[resumed]["norms"], uninterrupted["norms"][10:], atol=1e-5, rtol=1e-5
    )
    if resumed == "2->2":  # the same processes, the same shards: bitwise
        assert torch.equal(runs[resumed]["losses"], uninterrupted["losses"][10:])


@pytest.mark.slow
def test_only_safetensors_and_json_on_disk(runs):
    for saved_by, shards in (("2", 2), ("1", 1)):
        step = runs["dirs"][saved_by] / "checkpoints" / "step-00000010"
        files = sorted(str(p.relative_to(step)) for p in step.rglob("*") if p.is_file())
        names = [f"shard-{i:05d}-model-00001-of-00001.safetensors" for i in range(1, shards + 1)]
        sharded = [f"sharded/{d}/{n}" for d in ("model", "optim") for n in names]
        assert [f for f in files if f.startswith("sharded/")] == sorted(
            [*sharded, "sharded/sharded.json"]
        )  # no DCP .metadata (a pickle), no index file
        assert all(f.endswith((".json", ".safetensors")) for f in files), files
        manifest = json.loads((step / "manifest.json").read_text())
        assert sorted(manifest["files"]) == [f for f in files if f != "manifest.json"]


@pytest.mark.slow
def test_export_equals_the_unsharded_weights(runs, tmp_path):
    for saved_by in ("2", "1"):
        out = tmp_path / f"{saved_by}.safetensors"
        cmd = ["stoker", "checkpoint", "export", str(runs["dirs"][saved_by]), "-o", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "step-00000010" in done.stdout
        exported = safetensors.torch.load_file(out)
        expected = runs[f"saved-{saved_by}"]["weights"]  # after 10 steps
        assert exported.keys() == expected.keys()
        for name, weight in expected.items():
            assert torch.equal(exported[name], weight), name


@pytest.mark.slow
def test_sigkill_and_resume_under_fsdp_ends_bitwise_equal(runs, tmp_path):
    spec = [{"name": "killed", "strategy": "fsdp", "every": 3, "run_dir": str(tmp_path / "r")}]
    done = launch(tmp_path, spec, 2, "kill", env={"STOKER_FAULT_KILL_AT_STEP": "8"})
    assert done.returncode != 0  # rank 0 and 1 SIGKILLed at step 8; the checkpoint of 6 stands
    resumed = run_job(tmp_path, spec, 2, "resume")["killed"]
    assert resumed["start"] == 6
    uninterrupted = runs["2"]
    assert torch.equal(resumed["losses"], uninterrupted["losses"][6:])
    for name, weight in uninterrupted["weights"].items():
        assert torch.equal(resumed["weights"][name], weight), name


# In this process, without torch.distributed: a plain model saved and loaded.


@contextlib.contextmanager
def unpickling_raises() -> Iterator[None]:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("unpickled during load")

    with pytest.MonkeyPatch.context() as mp:
        for name in ("load", "loads", "Unpickler"):
            mp.setattr(pickle, name, refuse)
        mp.setattr(torch, "load", refuse)
        yield


def trained(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.8, 0.95))
    for _ in range(3):
        model(torch.randn(5, 4)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def test_load_never_unpickles_and_restores_optimizer_state(tmp_path):
    model, optimizer = trained(0)
    save_sharded(tmp_path / "ck", model, optimizer)
    fresh, fresh_opt = trained(1)
    fresh_opt.param_groups[0]["lr"] = 0.5
    with unpickling_raises():
        load_sharded(tmp_path / "ck", fresh, fresh_opt)
    for name, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    want, got = optimizer.state_dict(), fresh_opt.state_dict()
    assert got["param_groups"] == want["param_groups"]  # lr, betas (a tuple), ...
    for index, state in want["state"].items():
        assert state.keys() == got["state"][index].keys() == {"step", "exp_avg", "exp_avg_sq"}
        for key, value in state.items():
            assert torch.equal(got["state"][index][key], value), (index, key)


def test_model_only_round_trip(tmp_path):
    model, _ = trained(0)
    save_sharded(tmp_path / "ck", model)
    assert not (tmp_path / "ck" / "optim").exists()
    fresh, fresh_opt = trained(1)
    with unpickling_raises():
        load_sharded(tmp_path / "ck", fresh)
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters(), strict=True)
    )
    with pytest.raises(CheckpointError, match="saved without an optimizer"):
        load_sharded(tmp_path / "ck", fresh, fresh_opt)


def test_another_model_is_refused_naming_the_keys(tmp_path):
    model, _ = trained(0)
    save_sharded(tmp_path / "ck", model)
    other = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3), nn.Linear(3, 2))
    with pytest.raises(CheckpointMismatch, match=r"missing keys \['3.bias', '3.weight'\]"):
        load_sharded(tmp_path / "ck", other)


def test_a_used_directory_is_refused(tmp_path):
    model, optimizer = trained(0)
    save_sharded(tmp_path / "ck", model, optimizer)
    with pytest.raises(CheckpointError, match="new directory"):
        save_sharded(tmp_path / "ck", model, optimizer)
    with pytest.raises(CheckpointError, match=r"has no sharded\.json"):
        load_sharded(tmp_path / "nothing", model)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight  # one parameter, two state-dict names


def test_tied_weights_are_written_once_and_exported_under_both_names(tmp_path):
    model, fresh = Tied(), Tied()
    optimizer = torch.optim.AdamW(model.parameters())
    model.head(model.emb(torch.tensor([1, 2]))).sum().backward()
    optimizer.step()
    save_sharded(tmp_path / "ck", model, optimizer)
    fresh_opt = torch.optim.AdamW(fresh.parameters())
    with unpickling_raises():
        load_sharded(tmp_path / "ck", fresh, fresh_opt)
    assert fresh.head.weight is fresh.emb.weight
    assert torch.equal(fresh.emb.weight, model.emb.weight)
    assert torch.equal(
        fresh_opt.state_dict()["state"][0]["exp_avg"], optimizer.state[model.emb.weight]["exp_avg"]
    )
    exported = safetensors.torch.load_file(export_consolidated(tmp_path / "ck", tmp_path / "m.st"))
    assert exported.keys() == model.state_dict().keys()
    assert all(torch.equal(exported[k], v) for k, v in model.state_dict().items())
