"""Compressed forms compute their float parts in the precision this machine is fast at, and
``--quantize auto`` keeps the fastest form within its accuracy budget, as measured here."""

import json

import pytest
import torch

import stoker.cli
from stoker.compress import (
    AUTO_CANDIDATES,
    PruneConfig,
    QuantConfig,
    choose_quantization,
    compress,
    load_compressed,
)
from stoker.data import model_inputs


def _logits(model, batches):
    with torch.no_grad():
        return torch.cat([model(**model_inputs(b)).float().flatten() for b in batches])


@pytest.mark.parametrize("speedup", ["6", "0.02"])
def test_bf16_form_computes_in_bf16_only_where_it_is_fast(
    speedup, trained, val_batches, tmp_path, monkeypatch
):
    monkeypatch.setenv("STOKER_BF16_SPEEDUP", speedup)
    made = compress(trained, quant=QuantConfig(method="bf16"))
    # made.model holds the bf16-rounded weights in fp32: the fp32 computation of the file
    exact = _logits(made.model, val_batches)
    served = load_compressed(made.save(tmp_path / "m.safetensors"), compile=False)
    gap = (_logits(served, val_batches) - exact).abs().max().item()
    if speedup == "6":
        assert gap > 1e-4, "bf16 is fast here but the bf16 form computed in fp32"
    else:
        assert gap < 1e-5, f"bf16 is slow here but the bf16 form did not compute in fp32 ({gap})"


@pytest.mark.parametrize("budget", [0.0, 0.05])
def test_auto_keeps_the_fastest_form_within_the_budget(
    budget, trained, loader, val_batches, tmp_path
):
    choice = choose_quantization(
        trained,
        PruneConfig(),
        train_loader=loader,
        val_batches=val_batches,
        workdir=tmp_path,
        accuracy_budget=budget,
        batch_sizes=(1, 8),
        repeats=3,
        compile=False,
    )
    reference, rows = choice.rows[0], choice.rows
    assert [r.name for r in rows] == ["fp32", *AUTO_CANDIDATES[1:]]
    eligible = [r for r in rows if r.accuracy >= reference.accuracy - budget]
    fastest = min(eligible, key=lambda r: r.latency_ms[8].median)
    chosen = next(
        r for r in rows if r.name == ("fp32" if choice.method == "none" else choice.method)
    )
    assert chosen is fastest
    assert choice.reason.startswith(f"{fastest.name}: the fastest at batch 8")
    assert choice.compressed.quant.method == choice.method


def test_auto_from_the_cli_saves_the_chosen_form(run_dir, capsys):
    argv = ["compress", str(run_dir), "--quantize", "auto", "--calibration-batches", "2"]
    argv += ["--eval-batches", "2", "--repeats", "2", "--no-compile"]
    assert stoker.cli.main(argv) == 0
    out = capsys.readouterr()
    assert "auto chose" in out.err
    (saved,) = (run_dir / "compressed").glob("*.safetensors")
    rows = json.loads(saved.with_suffix(".json").read_text())
    assert [r["name"] for r in rows] == [
        "fp32",
        "int8-static",
        "int8-dynamic",
        "int8-weight",
        "bf16",
    ]
    assert saved.stem.startswith("none-")
