"""Every run ends with its HTML report in the run directory, its path printed; a report that
cannot be written is a warning, never a failed run."""

import json

import torch

import stoker.report
from stoker import Stoker
from stoker.records import RecordConfig


def _run(tmp_path):
    stoker = Stoker(device="cpu", precision="fp32", record=RecordConfig(directory=tmp_path))
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = stoker.prepare(model, optimizer)
    for _ in range(3):
        loss = model(torch.ones(2, 3)).square().mean()
        stoker.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        stoker.log({"loss": loss})
    stoker.close()


def test_a_finished_run_writes_its_report(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STOKER_REPORT", "1")
    _run(tmp_path)
    report = tmp_path / "report.html"
    assert f"stoker: report: {report}" in capsys.readouterr().err
    assert "<svg" in report.read_text()


def test_a_report_that_fails_is_a_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STOKER_REPORT", "1")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(stoker.report, "write_report", broken)
    _run(tmp_path)
    assert "stoker: warning: no HTML report" in capsys.readouterr().err
    assert json.loads((tmp_path / "record.json").read_text())["status"] == "finished"
