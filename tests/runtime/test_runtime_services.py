"""What a Stoker run gets without asking: record, metrics, final checkpoint, doctor report."""

import json

import pytest
import torch

from stoker import Stoker
from stoker.checkpoint import latest_valid
from stoker.doctor import DoctorConfig
from stoker.records import RecordConfig


def _train(stoker, steps):
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    data = torch.utils.data.TensorDataset(torch.randn(64, 16), torch.randint(0, 4, (64,)))
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True)
    model, optimizer, loader = stoker.prepare(model, optimizer, loader)
    while stoker.step < steps:
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            stoker.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            stoker.log({"loss": loss.detach()})
            if stoker.step == steps:
                break


def test_run_directory_metrics_checkpoint_and_doctor(tmp_path, monkeypatch):
    monkeypatch.setenv("STOKER_DOCTOR", "1")
    config = DoctorConfig(warmup_steps=1, window_steps=2, attribution_steps=1, probes=False)
    stoker = Stoker(
        device="cpu",
        precision="fp32",
        seed=0,
        config={"lr": 1e-3},
        record=RecordConfig(directory=tmp_path / "run", tee_console=False),
        doctor=config,
    )
    _train(stoker, steps=10)
    stoker.close()
    run = tmp_path / "run"
    record = json.loads((run / "record.json").read_text())
    assert record["config"] == {"lr": 1e-3}
    assert record["settings"]["precision"] == "fp32"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, 11))
    assert all(isinstance(line["loss"], float) for line in lines)
    final = latest_valid(run / "checkpoints")
    assert final is not None and final.name.endswith("10")
    report = json.loads((run / "doctor.json").read_text())
    assert report["summary"]["profiled_steps"] == 2
    assert stoker.doctor is not None and not stoker.doctor.active  # detached after its window


def test_resume_from_another_run_continues_the_step_count(tmp_path):
    first = Stoker(
        device="cpu", precision="fp32", seed=0, record=RecordConfig(directory=tmp_path / "a")
    )
    _train(first, steps=5)
    first.close()
    second = Stoker(
        device="cpu",
        precision="fp32",
        seed=0,
        record=RecordConfig(directory=tmp_path / "b"),
        resume=str(tmp_path / "a"),
    )
    _train(second, steps=8)
    assert second.resumed_from == 5
    assert second.step == 8


def test_checkpoint_takes_a_number_of_steps_or_a_config():
    from stoker import StokerError

    stoker = Stoker(device="cpu", precision="fp32", record=False, checkpoint=25)
    assert stoker.services.checkpoint_config.every_steps == 25
    with pytest.raises(StokerError, match=r"checkpoint='often'; pass a number of steps"):
        Stoker(device="cpu", precision="fp32", record=False, checkpoint="often")
