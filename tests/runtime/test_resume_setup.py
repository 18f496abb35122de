"""Resuming a changed setup: what would make the run silently different is refused in one line
(batch size, number of processes, seed, a loader position past its epoch); what can be handled
exactly is (precision, accumulation, the user's config) and record.json says what changed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from stoker import Stoker
from stoker.checkpoint import CheckpointConfig, CheckpointMismatch, CheckpointWarning
from stoker.checkpoint._files import sha256_file
from stoker.records import RecordConfig

DDP_JOB = Path(__file__).with_name("ddp_job.py")


def _stoker(run, **kwargs):
    kwargs.setdefault("seed", 0)
    record = RecordConfig(directory=run, tee_console=False)
    return Stoker(device="cpu", precision="fp32", record=record, **kwargs)


def _train(stoker, batch_size, steps):
    """Train to ``steps`` optimizer steps; returns the prepared loader (its position)."""
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 4, generator=g), torch.randn(64, 2, generator=g))
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True)
    model, optimizer, loader = stoker.prepare(model, optimizer, loader)
    while stoker.step < steps:
        for x, y in loader:
            with stoker.accumulate(model):
                stoker.backward(F.mse_loss(model(x), y))
                optimizer.step()
                optimizer.zero_grad()
            if stoker.step >= steps and stoker.sync_gradients:
                break
    return loader


def _refused(run, batch_size=8, **kwargs):
    stoker = _stoker(run, **kwargs)
    with pytest.raises(CheckpointMismatch) as info:
        _train(stoker, batch_size, steps=10)
    stoker.close(failed=info.value)
    return str(info.value)


def test_resuming_with_another_batch_size_is_refused_in_one_line(tmp_path):
    first = _stoker(tmp_path / "run")
    _train(first, batch_size=8, steps=5)
    first.close()
    message = _refused(tmp_path / "run", batch_size=4)
    assert "\n" not in message
    assert "5 batches into epoch 0 with batch_size=8; this one has batch_size=4" in message
    assert "resume with batch_size=8, or start over with resume='never'" in message


def test_resuming_with_another_seed_is_refused(tmp_path):
    first = _stoker(tmp_path / "run", seed=0)
    _train(first, batch_size=8, steps=3)
    first.close()
    message = _refused(tmp_path / "run", seed=1)
    assert "written with seed=0 and this run has seed=1" in message and "\n" not in message


# Slow (~19 s on an EPYC Zen 3); the other refusals stay in the default suite.
@pytest.mark.slow
def test_another_number_of_processes_resumes_only_with_the_same_global_batch(tmp_path):
    env = {**os.environ, "STOKER_RUN_DIR": str(tmp_path / "run")}
    two = [sys.executable, "-m", "stoker", "run", "--nproc", "2", str(DDP_JOB)]
    done = subprocess.run(
        [*two, str(tmp_path / "a.pt"), "--batch", "4"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # 1 process x 4 rows is another global batch than 2 x 4: refused, in one line.
    one = [sys.executable, str(DDP_JOB), str(tmp_path / "b.pt")]
    done = subprocess.run([*one, "--batch", "4"], env=env, capture_output=True, text=True)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert lines[0].startswith("stoker: error: checkpoint ")
    assert "by 2 process(es) x batch_size=4; this run has 1 x batch_size=4" in lines[0]
    assert "resume with batch_size=8 per process" in lines[0] and "resume='never'" in lines[0]
    record = json.loads((tmp_path / "run" / "record.json").read_text())
    assert record["world_size"] == 1 and record["status"] == "failed"
    # 1 x 8 rows: the same samples per step, resumed (and recorded as changed).
    done = subprocess.run([*one, "--batch", "8"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "record.json").read_text())
    assert record["status"] == "finished" and len(record["attempts"]) == 3
    changed = record["resumed_from"]["changed"]
    assert changed["settings.world_size"] == {"was": 2, "now": 1}


def test_accepted_changes_are_handled_and_recorded(tmp_path):
    run = tmp_path / "run"
    first = _stoker(run, config={"lr": 0.1})
    _train(first, batch_size=8, steps=3)
    first.close()
    second = _stoker(run, config={"lr": 0.05}, accumulation_steps=2)
    loader = _train(second, batch_size=8, steps=5)
    second.close()
    assert second.resumed_from == 3
    # Windows of 2 micro-batches from the resumed step: steps 4 and 5 took batches 4-7.
    assert loader.position == 7
    record = json.loads((run / "record.json").read_text())
    assert record["resumed_from"]["step"] == 3
    assert record["resumed_from"]["checkpoint"].endswith("step-00000003")
    assert record["resumed_from"]["changed"] == {
        "config.lr": {"was": 0.1, "now": 0.05},
        "settings.accumulation_steps": {"was": 1, "now": 2},
    }
    assert record["attempts"][-1]["resumed_from"] == record["resumed_from"]
    assert record["config"] == {"lr": 0.05} and record["settings"]["accumulation_steps"] == 2


def _set_loader_position(ckpt, position):
    """Rewrite the loader position in state.json and reseal the manifest (a consistent,
    crafted checkpoint)."""
    doc = json.loads((ckpt / "state.json").read_text())
    doc["entries"]["loader"]["data"]["position"] = position
    (ckpt / "state.json").write_text(json.dumps(doc))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    digest, size = sha256_file(ckpt / "state.json")
    manifest["files"]["state.json"].update(sha256=digest, bytes=size)
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def test_a_loader_position_past_its_epoch_is_refused_and_the_previous_checkpoint_used(tmp_path):
    run = tmp_path / "run"
    first = _stoker(run, checkpoint=CheckpointConfig(every_steps=2, keep_last=None))
    _train(first, batch_size=8, steps=4)
    first.close()
    _set_loader_position(run / "checkpoints" / "step-00000004", 10**6)  # replay: hours
    second = _stoker(run)
    with pytest.warns(CheckpointWarning) as caught:
        _train(second, batch_size=8, steps=5)
    second.close()
    message = str(caught[0].message)
    assert "step-00000004" in message and "\n" not in message
    assert "position, 1000000 batches into epoch 0, is past the end of its 8 batches" in message
    assert second.resumed_from == 2


def test_docstring_examples_run():
    import doctest

    import stoker.runtime.setup

    result = doctest.testmod(stoker.runtime.setup)
    assert result.attempted > 0 and result.failed == 0
