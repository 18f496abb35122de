"""``stoker tune``: on the built-in MLM job and on a user's job function, within its bounds."""

import json
import time
from pathlib import Path

import pytest

from stoker.cli import main

JOB = """
import torch

class Job:
    def __init__(self):
        torch.manual_seed(0)
        self.model = torch.nn.Linear(4, 1)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)
        self.batch_size, self.lr = 8, 0.1
        self.x = torch.randn(256, 4)
        self.y = self.x.sum(1, keepdim=True)

    def loss(self, batch):
        x, y = batch
        return torch.nn.functional.mse_loss(self.model(x), y)

    def loader(self, batch_size, num_workers=0):
        return [(self.x[i:i + batch_size], self.y[i:i + batch_size])
                for i in range(0, 256, batch_size)]

def make_job():
    return Job()

raise SystemExit("the module body must not run the training loop: guarded by __main__")
"""


def _record(root: Path) -> dict:
    (run,) = root.iterdir()
    return json.loads((run / "record.json").read_text())


def test_tune_lr_on_a_user_job_writes_the_number_and_plot_to_the_record(
    tmp_path, monkeypatch, capsys
):
    script = tmp_path / "train.py"
    script.write_text(
        JOB.replace("raise SystemExit", 'if __name__ == "__main__":\n    raise SystemExit')
    )
    monkeypatch.setenv("STOKER_RUNS_DIR", str(tmp_path / "runs"))
    code = main(["tune", "lr", "--job", f"{script}:make_job", "--steps", "30", "--max-lr", "10"])
    assert code == 0
    out = capsys.readouterr().out
    assert "suggested one-cycle peak LR" in out
    found = _record(tmp_path / "runs")["tune"]["lr"]
    assert min(found["lrs"]) <= found["suggestion"] <= max(found["lrs"])
    assert Path(found["plot"]).read_bytes()[:4] == b"\x89PNG"


def test_a_bad_job_spec_is_one_line(tmp_path, capsys):
    script = tmp_path / "train.py"
    script.write_text("def other():\n    pass\n")
    assert main(["tune", "threads", "--job", f"{script}:make_job"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stoker: error: --job") and "other" in err and err.count("\n") == 1


# Slow (~14 s on an EPYC Zen 3); tests/tune/test_finders.py keeps each finder's bounds.
@pytest.mark.slow
def test_tune_batch_size_and_threads_on_the_default_mlm_within_bounds(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("STOKER_RUNS_DIR", str(tmp_path / "runs"))
    began = time.perf_counter()
    argv = ["tune", "batch-size", "--candidates", "2,4,8", "--steps", "1", "--max-seconds", "40"]
    assert main(argv) == 0
    job_seconds = time.perf_counter() - began
    assert job_seconds < 40 + 30  # the search's bound plus loading the corpus and model
    found = _record(tmp_path / "runs")["tune"]["batch_size"]
    speeds = {int(r[0]): float(r[1].replace(",", "")) for r in found["trials"] if r[1] != "-"}
    assert found["best"] == max(speeds, key=speeds.get)  # the best measured is the one named
    assert found["recommended"] == found["best"]  # the default margin is 0
    out = capsys.readouterr().out
    assert "recommended batch size" in out and "samples/s" in out

    argv = [
        "tune",
        "threads",
        "--candidates",
        "1,2",
        "--workers",
        "0",
        "--steps",
        "2",
        "--max-seconds",
        "40",
        "--no-record",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.count("│") == 5]
    times = {int(r.split("│")[1]): float(r.split("│")[3].replace(",", "")) for r in rows}
    best = min(times, key=times.get)
    assert f"torch.set_num_threads({best}), num_workers=0" in out


@pytest.mark.parametrize("flag", ["--candidates", "--workers"])
def test_bad_lists_are_one_line(flag, capsys):
    assert main(["tune", "threads", flag, "a,b"]) == 2
    assert "comma-separated integers" in capsys.readouterr().err
