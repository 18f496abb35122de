"""Trackers read back with their own readers: TensorBoard's event accumulator, MLflow's client
on its local store. These need the extras (`pip install 'stoker[tensorboard,mlflow]'`, in the
`test` extra): a missing one fails here with that line, it is not skipped."""

import importlib.util
import json

import pytest
import torch

from stoker import Stoker
from stoker.errors import StokerError
from stoker.meters import MetersConfig
from stoker.records import RecordConfig, read_metrics, read_record
from stoker.records import trackers as trackers_module


def _needs(module, extra):
    if importlib.util.find_spec(module) is None:
        pytest.fail(f"{module} is not installed: pip install 'stoker[{extra}]' (the test extra)")


def _run(tmp_path, trackers, steps=12):
    stoker = Stoker(
        device="cpu",
        precision="fp32",
        config={"lr": 0.05, "model": {"width": 8}},
        record=RecordConfig(directory=tmp_path / "run", save_code=False, flush_seconds=0.01),
        meters=MetersConfig(every_steps=5, min_seconds=0),
        trackers=trackers,
    )
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    model, optimizer = stoker.prepare(model, torch.optim.SGD(model.parameters(), lr=0.05))
    for step in range(1, steps + 1):
        loss = model(torch.randn(4, 8)).square().mean()
        stoker.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        stoker.log({"loss": loss.detach(), "lr": 0.05 / step, "note": "text is not a scalar"})
    stoker.close()
    run_dir = tmp_path / "run"
    return run_dir, read_metrics(run_dir / "metrics.jsonl")


def test_tensorboard_event_files_hold_the_logged_scalars(tmp_path):
    _needs("tensorboard", "tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, lines = _run(tmp_path, ["tensorboard"])
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"loss", "lr", "mfu", "step_s_p50", "peak_memory_mb"} <= set(scalars)
    logged = [(r["step"], r["loss"]) for r in lines if "loss" in r]
    read = [(e.step, e.value) for e in events.Scalars("loss")]
    assert [s for s, _ in read] == [s for s, _ in logged]
    assert [v for _, v in read] == pytest.approx([v for _, v in logged], rel=1e-6)
    mfu = [r["mfu"] for r in lines if "mfu" in r]
    assert [e.value for e in events.Scalars("mfu")] == pytest.approx(mfu, rel=1e-6)
    assert "run" in events.Tags()["tensors"] or "run/text_summary" in events.Tags()["tensors"]


def test_mlflow_local_store_holds_metrics_params_and_tags(tmp_path):
    _needs("mlflow", "mlflow")
    from mlflow.tracking import MlflowClient

    run_dir, lines = _run(tmp_path, ["mlflow"])
    assert (run_dir / "mlflow.db").is_file()  # offline: the store is in the run directory
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    record = read_record(run_dir)
    assert run.data.params["config.lr"] == "0.05" and run.data.params["config.model.width"] == "8"
    assert run.data.params["settings.precision"] == "fp32"
    assert run.data.tags["stoker.run_id"] == record["id"]
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "loss")
    logged = [(r["step"], r["loss"]) for r in lines if "loss" in r]
    assert sorted((m.step, m.value) for m in history) == pytest.approx(sorted(logged))
    mfu = client.get_metric_history(run.info.run_id, "mfu")
    assert [m.value for m in mfu] == pytest.approx([r["mfu"] for r in lines if "mfu" in r])
    summary = json.loads(json.dumps(record["summary"]["meters"]))
    assert float(run.data.tags["stoker.summary.meters.mfu"]) == pytest.approx(summary["mfu"])


def test_a_missing_extra_is_one_line_naming_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        trackers_module.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "mlflow" else real(name, *a),
    )
    with pytest.raises(StokerError, match=r"pip install 'stoker\[mlflow\]'"):
        Stoker(device="cpu", record=False, trackers=["mlflow"])
    with pytest.raises(StokerError, match="not known; choose from"):
        Stoker(device="cpu", trackers=["wandb"])
    with pytest.raises(StokerError, match="record=False"):
        Stoker(device="cpu", record=False, trackers=["tensorboard"])


def test_a_failing_tracker_is_dropped_and_the_run_goes_on(tmp_path, capsys):
    class Broken:
        name = "broken"

        def start(self, run_dir, record):
            pass

        def log(self, step, stamp, metrics):
            raise ConnectionError("server down")

        def finish(self, record):
            raise AssertionError("a dropped tracker is not called again")

    run_dir, lines = _run(tmp_path, [Broken()], steps=3)
    assert read_record(run_dir)["status"] == "finished"
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3]
    err = capsys.readouterr().err
    assert err.count("tracker 'broken' failed in log") == 1 and "server down" in err


def test_a_run_without_metrics_still_starts_and_finishes_its_trackers(tmp_path):
    calls = []

    class Recording:
        name = "recording"

        def start(self, run_dir, record):
            calls.append(("start", record["status"]))

        def log(self, step, stamp, metrics):
            calls.append(("log", step))

        def finish(self, record):
            calls.append(("finish", record["status"]))

    stoker = Stoker(
        device="cpu",
        record=RecordConfig(directory=tmp_path / "run", save_code=False),
        trackers=[Recording()],
    )
    stoker.close()
    assert calls == [("start", "finished"), ("finish", "finished")]
