"""stoker doctor on bad input: one clear line, and the user's run is never broken by the doctor."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from torch.optim import optimizer as optimizer_module
from torch.utils.data import DataLoader

from stoker.doctor import Doctor, DoctorConfig, active_doctor, diagnose_script
from stoker.doctor import session as session_module
from stoker.errors import StokerError

FAST = DoctorConfig(
    warmup_steps=1, window_steps=2, attribution_steps=1, stop_after_window=True, probes=False
)

LOOP = """
import sys
import torch
from torch import nn
model = nn.Linear(8, 8)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 20
for step in range(STEPS):
    {before}
    loss = model(torch.randn(4, 8)).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
print("FINISHED", STEPS)
"""


def _script(tmp_path: Path, before: str = "pass", name: str = "train.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(LOOP.format(before=before)))
    return path


def test_missing_script(tmp_path: Path) -> None:
    with pytest.raises(StokerError, match=r"no such script: .*nope\.py"):
        diagnose_script(tmp_path / "nope.py", [], FAST)


def test_crash_before_window(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _script(tmp_path, "if step == 1: raise ZeroDivisionError('boom')")
    with pytest.raises(StokerError) as info:
        diagnose_script(path, [], FAST)
    message = str(info.value)
    assert "\n" not in message
    assert "raised ZeroDivisionError at train.py:" in message
    assert "after 1 training step" in message
    assert "boom" in capsys.readouterr().err  # the user's own traceback is shown first


def test_window_longer_than_run(tmp_path: Path) -> None:
    with pytest.raises(StokerError, match=r"finished after 2 training step\(s\) but the doctor "):
        diagnose_script(_script(tmp_path), ["2"], FAST)


def test_run_without_steps(tmp_path: Path) -> None:
    with pytest.raises(StokerError, match=r"without a single optimizer\.step"):
        diagnose_script(_script(tmp_path), ["0"], FAST)


def test_nonzero_exit_before_window(tmp_path: Path) -> None:
    path = _script(tmp_path, "if step == 1: sys.exit(3)")
    with pytest.raises(StokerError, match="exited with status 3 after 1 training step"):
        diagnose_script(path, [], FAST)


def test_stops_after_window_even_through_except_exception(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    loop = LOOP.replace(
        "    opt.step()", "    try:\n        opt.step()\n    except Exception:\n        pass"
    )
    path = tmp_path / "catchall.py"
    path.write_text(textwrap.dedent(loop.format(before="pass")))
    report = diagnose_script(path, ["1000"], FAST)
    assert "FINISHED" not in capsys.readouterr().out
    assert report.summary["profiled_steps"] == 2


def test_full_run_continues_and_restores_the_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    originals = (
        DataLoader.__init__,
        torch.optim.Optimizer.zero_grad,
        torch.compile,
        torch.autograd.backward,
        torch.set_num_threads,
    )
    config = DoctorConfig(warmup_steps=1, window_steps=2, attribution_steps=1, probes=False)
    report = diagnose_script(_script(tmp_path), ["30"], config)
    assert "FINISHED 30" in capsys.readouterr().out
    assert originals == (
        DataLoader.__init__,
        torch.optim.Optimizer.zero_grad,
        torch.compile,
        torch.autograd.backward,
        torch.set_num_threads,
    )
    assert not optimizer_module._global_optimizer_post_hooks
    out = report.write_json(tmp_path)
    data = json.loads(Path(out).read_text())
    assert data["summary"]["profiled_steps"] == 2 and data["findings"] == []
    assert "No findings" in report.render_text()


def test_internal_failure_never_breaks_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("doctor bug")

    monkeypatch.setattr(session_module, "summarize_events", broken)
    with pytest.raises(StokerError, match="disabled itself after an internal error"):
        diagnose_script(_script(tmp_path), ["15"], FAST)
    assert "FINISHED 15" in capsys.readouterr().out  # the script ran to its end


def test_runtime_api_manual_steps() -> None:
    """The runtime's way in: attach(auto_step=False) and one step() per optimizer step."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    doctor = Doctor(
        DoctorConfig(warmup_steps=1, window_steps=2, attribution_steps=1, probes=False)
    ).attach(auto_step=False)
    try:
        with pytest.raises(StokerError, match="already attached"):
            Doctor().attach()
        assert active_doctor() is doctor
        for _ in range(6):
            loss = model(torch.randn(4, 8)).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            doctor.step()
        assert doctor.done
    finally:
        doctor.detach()
    assert active_doctor() is None
    report = doctor.report()
    assert report.summary["profiled_steps"] == 2
    assert report.summary["phases_ms"]["forward"] > 0
    assert report.summary["phases_ms"]["optimizer"] > 0  # timed by the hooks, not counted


def test_config_validation() -> None:
    with pytest.raises(StokerError, match="window_steps=0"):
        DoctorConfig(window_steps=0)
    with pytest.raises(StokerError, match="warmup_steps=-1"):
        DoctorConfig(warmup_steps=-1)


TOKENS = """
import sys
import torch
from torch import nn
from torch.utils.data import DataLoader

REAL = int(sys.argv[1])  # real tokens per 64-token row; the rest is padding


def collate(rows):
    ids = torch.stack(rows)
    valid = torch.zeros(ids.shape, dtype=torch.bool)
    valid[:, :REAL] = True
    return {"input_ids": ids, "valid": valid}


loader = DataLoader([torch.randint(0, 100, (64,)) for _ in range(256)], batch_size=16,
                    collate_fn=collate)
model = nn.Sequential(nn.Embedding(100, 64), nn.Linear(64, 64))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
for batch in loader:
    loss = model(batch["input_ids"]).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
"""


@pytest.mark.parametrize("real,expected", [(16, 0.75), (64, 0.0)])
def test_padding_counted_from_token_batches(tmp_path: Path, real: int, expected: float) -> None:
    path = tmp_path / "tokens.py"
    path.write_text(TOKENS)
    report = diagnose_script(path, [str(real)], FAST)
    codes = {f.code: f for f in report.findings}
    assert report.summary["padding_fraction"] == pytest.approx(expected)
    if expected:
        waste = codes["padding-waste"]
        assert waste.evidence["padding_fraction"] == pytest.approx(expected)
        assert waste.location is not None and waste.location.endswith("tokens.py:17")
    else:
        assert "padding-waste" not in codes


def test_docstring_example() -> None:
    import doctest

    assert doctest.testmod(session_module, raise_on_error=False).failed == 0
