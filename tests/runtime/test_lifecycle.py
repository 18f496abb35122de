"""A run ends once, in the process that started it: never in a forked DataLoader worker."""

import gc
import json
import weakref
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from stoker import Stoker
from stoker.checkpoint import list_checkpoints
from stoker.checkpoint.check_resume import CheckResumeConfig, check_resume
from stoker.records import RecordConfig

WORKERS_JOB = str(Path(__file__).with_name("workers_job.py"))


class _ChattyData(Dataset):
    """Prints from inside the worker processes (what a user's dataset may well do)."""

    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if i == 0:
            print("hello from a DataLoader worker", flush=True)
        g = torch.Generator().manual_seed(i)
        return torch.randn(4, generator=g), torch.randn(1, generator=g)


def _status(run: Path) -> str:
    return json.loads((run / "record.json").read_text())["status"]


def test_dataloader_workers_write_no_checkpoint_record_or_console(tmp_path):
    run = tmp_path / "run"
    stoker = Stoker(device="cpu", precision="fp32", seed=0, record=RecordConfig(directory=run))
    loader = DataLoader(_ChattyData(), batch_size=8, shuffle=True, num_workers=2)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer, loader = stoker.prepare(model, optimizer, loader)
    for _ in range(3):  # each epoch starts 2 workers, which exit when it ends
        for x, y in loader:
            stoker.backward(torch.nn.functional.mse_loss(model(x), y))
            optimizer.step()
            optimizer.zero_grad()
    assert stoker.step == 12
    # The workers have exited; none of them ended the run, checkpointed or copied its output.
    assert _status(run) == "running"
    assert list_checkpoints(run / "checkpoints") == []
    assert "hello from a DataLoader worker" not in (run / "console.log").read_text()
    stoker.close()
    assert _status(run) == "finished"
    assert [step for step, _ in list_checkpoints(run / "checkpoints")] == [12]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000012"]


def test_a_dropped_stoker_is_garbage_collected(tmp_path):
    stoker = Stoker(device="cpu", precision="fp32", record=RecordConfig(directory=tmp_path / "r"))
    model = torch.nn.Linear(4, 2)
    model, optimizer = stoker.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    stoker_ref, model_ref = weakref.ref(stoker), weakref.ref(model)
    del stoker, model, optimizer
    gc.collect()
    assert stoker_ref() is None and model_ref() is None


@pytest.mark.slow
def test_sigkill_and_resume_with_dataloader_workers_is_bitwise_exact(tmp_path):
    # 12 batches per epoch, a checkpoint every 4 steps; killed at step 26, after the third
    # epoch's workers were started at step 24 (they hold a forked copy of the whole run).
    result = check_resume(
        WORKERS_JOB,
        ["--steps", "30", "--every", "4", "--workers", "2"],
        CheckResumeConfig(kills=1, seed=6, workdir=tmp_path),
        echo=lambda _: None,
    )
    assert result.kill_steps == [26]
    assert result.identical, result.differences[:5]
    assert result.first_loss_difference is None
    for run in (result.reference_dir, result.resumed_dir):
        names = sorted(p.name for p in (run / "checkpoints").iterdir())
        assert names == [f"step-{s:08d}" for s in (0, 4, 8, 12, 16, 20, 24, 28, 30)], names
