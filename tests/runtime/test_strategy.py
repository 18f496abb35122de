"""``Stoker(strategy=...)`` in one process: bad choices refused in one line, sharded checkpoints
written and resumed without torch.distributed, an optimizer that already stepped refused, and a
loader's rule for resuming on another number of processes. The 2-process FSDP runs are in
test_sharding.py and checkpoint/test_sharded.py (slow)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from stoker import FSDPConfig, Stoker, StokerError
from stoker.checkpoint import CheckpointMismatch
from stoker.records import RecordConfig
from stoker.runtime.distributed import DistributedContext
from stoker.runtime.prepared import PreparedLoader
from stoker.runtime.step import TrainingStep
from stoker.runtime.strategy import rebind_optimizer


def test_unknown_strategy_and_fp16_under_fsdp_are_refused_in_one_line():
    # (fp16 needs CUDA: on this CPU-only machine only the strategy's refusal is checked)
    with pytest.raises(StokerError, match=r"strategy='zero3'; use one of 'auto', 'ddp', 'fsdp'"):
        Stoker(device="cpu", precision="fp32", record=False, strategy="zero3")
    if torch.cuda.is_available():  # fp16 itself is refused on CPU, before the strategy
        with pytest.raises(StokerError, match=r"precision='fp16' is not supported.*use precision="):
            Stoker(device="cuda", precision="fp16", record=False, strategy=FSDPConfig())


def model_and_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train(run: Path | None, steps: int, every: int | None = None) -> tuple[Stoker, torch.nn.Module]:
    stoker = Stoker(
        device="cpu",
        precision="fp32",
        seed=0,
        strategy="fsdp",
        doctor=False,
        checkpoint=every,
        record=RecordConfig(directory=run, tee_console=False) if run else False,
    )
    model, optimizer = stoker.prepare(*model_and_optimizer())
    g = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(6, 8, 6, generator=g), torch.randint(0, 3, (6, 8), generator=g)
    for step in range(stoker.step, steps):
        stoker.backward(F.cross_entropy(model(xs[step]), ys[step]))
        optimizer.step()
        optimizer.zero_grad()
    stoker.close()
    return stoker, stoker.unwrap(model)


def test_one_process_fsdp_writes_sharded_checkpoints_and_resumes_them(tmp_path):
    # One process has nothing to shard, but its checkpoints take the sharded form, so that a
    # run on more processes can resume them (1 -> 2 is in checkpoint/test_sharded.py).
    _, uninterrupted = train(None, 6)
    train(tmp_path / "run", 3, every=3)
    step = tmp_path / "run" / "checkpoints" / "step-00000003"
    assert (step / "sharded" / "sharded.json").is_file()
    assert not (step / "model.safetensors").exists()  # the model lives in sharded/ only
    resumed, second = train(tmp_path / "run", 6, every=3)
    assert resumed.resumed_from == 3
    for name, weight in uninterrupted.state_dict().items():
        assert torch.equal(second.state_dict()[name], weight), name
    out = tmp_path / "model.safetensors"
    done = subprocess.run(
        ["stoker", "checkpoint", "export", str(tmp_path / "run"), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "step-00000006" in done.stdout
    exported = safetensors.torch.load_file(out)
    assert exported.keys() == uninterrupted.state_dict().keys()
    assert all(torch.equal(exported[k], v) for k, v in uninterrupted.state_dict().items())


def test_export_of_a_directory_without_checkpoints_is_one_line(tmp_path):
    cmd = ["stoker", "checkpoint", "export", str(tmp_path), "-o", str(tmp_path / "m.st")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert done.stderr.count("\n") == 1 and "holds no valid checkpoint" in done.stderr


def test_an_optimizer_that_already_stepped_cannot_follow_the_shards():
    model, optimizer = model_and_optimizer()
    model(torch.randn(2, 6)).sum().backward()
    optimizer.step()
    renamed = {id(p): torch.nn.Parameter(p.detach().clone()) for p in model.parameters()}
    with pytest.raises(StokerError, match=r"has already stepped.*create it fresh"):
        rebind_optimizer(optimizer, renamed)
    fresh = torch.optim.SGD(model.parameters(), lr=0.1)
    rebind_optimizer(fresh, renamed)
    assert [id(p) for p in fresh.param_groups[0]["params"]] == [
        id(renamed[id(p)]) for p in model.parameters()
    ]


def loader(batch_size: int, *, world_invariant: bool = True) -> PreparedLoader:
    data = DataLoader(TensorDataset(torch.arange(64.0)), batch_size=batch_size)
    steps = TrainingStep(accumulation_steps=1, scaler=None, dist=DistributedContext())
    return PreparedLoader(
        data,
        torch.device("cpu"),
        steps,
        seed=0,
        replayed=lambda: None,
        world_invariant=world_invariant,
    )


def saved_by_two(batch_size: int) -> dict[str, int]:
    # What rank 0 of 2 processes with `batch_size` rows each saved, 3 batches into epoch 0.
    return {
        "epoch": 0,
        "position": 3,
        "batch_size": batch_size,
        "batches": 64 // 2 // batch_size,
        "world_size": 2,
    }


def test_a_loader_resumes_on_fewer_processes_only_with_the_same_global_batch():
    loader(8).check_state_dict(saved_by_two(4))  # 2 x 4 rows -> 1 x 8 rows: the same samples
    with pytest.raises(CheckpointMismatch, match="resume with batch_size=8 per process"):
        loader(4).check_state_dict(saved_by_two(4))
    with pytest.raises(CheckpointMismatch, match="splits the data by rank itself"):
        loader(8, world_invariant=False).check_state_dict(saved_by_two(4))
