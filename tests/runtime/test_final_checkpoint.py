"""The checkpoint written when a run ends: of the last step taken, never of step 0 unasked."""

import torch

from stoker import Stoker
from stoker.checkpoint import list_checkpoints
from stoker.records import RecordConfig


def _prepared(run):
    stoker = Stoker(device="cpu", precision="fp32", record=RecordConfig(directory=run))
    model = torch.nn.Linear(4, 2)
    model, optimizer = stoker.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    return stoker, model, optimizer


def test_a_run_that_took_no_step_writes_no_checkpoint(tmp_path):
    stoker, _, _ = _prepared(tmp_path / "run")
    stoker.close()
    assert list_checkpoints(tmp_path / "run" / "checkpoints") == []


def test_step_zero_is_saved_when_asked_and_the_last_step_at_the_end(tmp_path):
    stoker, model, optimizer = _prepared(tmp_path / "asked")
    assert stoker.save_checkpoint().name == "step-00000000"
    stoker.close()
    assert [s for s, _ in list_checkpoints(tmp_path / "asked" / "checkpoints")] == [0]

    stoker, model, optimizer = _prepared(tmp_path / "trained")
    for _ in range(2):
        stoker.backward(model(torch.randn(3, 4)).sum())
        optimizer.step()
        optimizer.zero_grad()
    stoker.close()
    assert [s for s, _ in list_checkpoints(tmp_path / "trained" / "checkpoints")] == [2]
