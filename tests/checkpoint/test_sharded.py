"""Sharded checkpoints: resume at the same and at another world size continues the same
trajectory, the export equals the unsharded weights, and loading never unpickles.

The multi-process runs are tests/runtime/fsdp_job.py (2 processes under torchrun, gloo; 1
process without torch.distributed); every resumed run loads with pickle and torch.load patched
to raise."""

from __future__ import annotations

import contextlib
import json
import pickle
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

JOB = Path(__file__).parents[1] / "runtime" / "fsdp_job.py"


def run_job(tmp: Path, specs: list[dict[str, Any]], nproc: int, tag: str) -> dict[str, Any]:
    """Runs fsdp_job.py in ``nproc`` processes (1: plain python, no torch.distributed)."""
    spec_file, out = tmp / f"spec-{tag}.json", tmp / f"out-{tag}.pt"
    spec_file.write_text(json.dumps(specs))
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd = [sys.executable, *(launcher if nproc > 1 else []), str(JOB), str(spec_file), str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Any]:
    """Saves at step 10 of 20 from 2 processes and from 1; resumes 2 -> 2, 2 -> 1, 1 -> 2."""
    tmp = tmp_path_factory.mktemp("sharded")
    by2, by1 = str(tmp / "saved-by-2"), str(tmp / "saved-by-1")
    resume = {"strategy": "fsdp", "start": 10, "no_pickle": True}
    single = {"name": "single", "strategy": "single", "save_at": 10, "save_dir": by1}
    out = run_job(tmp, [single], 1, "a")
    out |= run_job(
        tmp,
        [
            {"name": "fsdp", "strategy": "fsdp", "save_at": 10, "save_dir": by2},
            {**resume, "name": "2->2", "resume": by2},
            {**resume, "name": "1->2", "resume": by1},
        ],
        2,
        "b",
    )
    out |= run_job(tmp, [{**resume, "name": "2->1", "strategy": "single", "resume": by2}], 1, "c")
    out["dirs"] = {"2": Path(by2), "1": Path(by1)}
    return out


# The tests on `runs` launch 2-process jobs (~30 s in all): slow-marked until the sharded path
# is behind Stoker, to keep the default suite well under 10 minutes.
@pytest.mark.slow
@pytest.mark.parametrize("resumed", ["2->2", "2->1", "1->2"])
def test_resume_continues_the_same_trajectory(runs, resumed):
    uninterrupted = runs["fsdp" if resumed.startswith("2") else "single"]
    assert len(runs[resumed]["losses"]) == 10
    torch.testing.assert_close(
        runs[resumed]["losses"], uninterrupted["losses"][10:], atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        runs[resumed]["norms"], uninterrupted["norms"][10:], atol=1e-5, rtol=1e-5
    )


@pytest.mark.slow
def test_only_safetensors_and_json_on_disk(runs):
    for saved_by, shards in (("2", 2), ("1", 1)):
        root = runs["dirs"][saved_by]
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        names = [f"shard-{i:05d}-model-00001-of-00001.safetensors" for i in range(1, shards + 1)]
        expected = [f"{d}/{n}" for d in ("model", "optim") for n in names] + ["sharded.json"]
        assert files == sorted(expected)  # no DCP .metadata (a pickle), no index file


@pytest.mark.slow
def test_export_equals_the_unsharded_weights(runs, tmp_path):
    for saved_by in ("2", "1"):
        out = export_consolidated(runs["dirs"][saved_by], tmp_path / f"{saved_by}.safetensors")
        exported = safetensors.torch.load_file(out)
        expected = runs["fsdp" if saved_by == "2" else "single"]["saved_weights"]
        assert exported.keys() == expected.keys()
        for name, weight in expected.items():
            assert torch.equal(exported[name], weight), name


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
