"""`stoker doctor` as a subcommand module (NAME, HELP, add_arguments, main)."""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

import pytest

from stoker.cli import doctor as doctor_cli

SCRIPT = """
import sys
import torch
from torch import nn
model = nn.Linear(8, 8)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
assert sys.argv[1:] == ["--width", "8"], sys.argv
for step in range(50):
    loss = model(torch.randn(4, 8)).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
"""


def _args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="stoker doctor")
    doctor_cli.add_arguments(parser)
    args, extra = parser.parse_known_args(argv)
    args.extra = extra
    return args


def test_cli_runs_a_script_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(SCRIPT))
    out = tmp_path / "out.json"
    argv = [
        "--warmup",
        "1",
        "--steps",
        "2",
        "--attribution-steps",
        "1",
        "--no-probes",
        "--json",
        str(out),
        str(script),
        "--width",
        "8",
    ]
    assert doctor_cli.NAME == "doctor" and doctor_cli.HELP
    assert doctor_cli.main(_args(argv)) == 0
    printed = capsys.readouterr().out
    assert "then stopping it" in printed and "stoker doctor" in printed
    data = json.loads(out.read_text())
    assert data["summary"]["profiled_steps"] == 2 and data["findings"] == []


def test_profiler_lines_do_not_leak_into_the_output(tmp_path: Path) -> None:
    """kineto prints ``USDT: ... profiler_start`` to file descriptor 2 from C++: only a real
    process shows it, so this runs the CLI in one."""
    import subprocess
    import sys

    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(SCRIPT))
    argv = ["--warmup", "1", "--steps", "2", "--attribution-steps", "1", "--no-probes"]
    done = subprocess.run(
        [sys.executable, "-m", "stoker", "doctor", *argv, str(script), "--width", "8"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "stoker doctor" in done.stdout
    assert "USDT" not in done.stderr + done.stdout, done.stderr
