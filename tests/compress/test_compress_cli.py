"""`stoker compress` and `stoker experiment` end to end on the real corpus (small settings)."""

import json

import pytest

import stoker.cli


def test_compress_writes_the_model_and_the_table(run_dir, capsys):
    argv = ["compress", str(run_dir), "--prune", "structured", "--sparsity", "0.5"]
    argv += ["--quantize", "int8-static", "--finetune-steps", "2", "--calibration-batches", "2"]
    argv += ["--eval-batches", "2", "--repeats", "2", "--no-compile"]
    assert stoker.cli.main(argv) == 0
    out = run_dir / "compressed" / "structured-50-int8-static.safetensors"
    assert out.is_file()
    rows = json.loads(out.with_suffix(".json").read_text())
    assert [r["name"] for r in rows] == ["fp32", "bf16", "structured-50% + int8-static"]
    assert rows[2]["params"] < rows[0]["params"]
    assert rows[2]["linear_weight_bytes"] * 3.5 < rows[0]["linear_weight_bytes"]
    captured = capsys.readouterr()
    assert "stoker compress" in captured.out
    # the run's report is written again with the table and the chart
    report = run_dir / "report.html"
    assert f"report: {report}" in captured.err.replace("\n", "")
    html = report.read_text()
    assert 'id="compression"' in html and "structured-50% + int8-static" in html
    assert "accuracy (%) against latency at batch 1 (ms)" in html


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compress", "/nonexistent/run"], "no runs under"),
        (["compress", "{run}", "--sparsity", "1.5", "--prune", "magnitude"], "must be in [0, 1)"),
        (["compress", "{run}", "--out", "/tmp"], "--out /tmp: give a file path ending in"),
        (["compress", "{run}", "--out", "/proc/x/y.safetensors"], "cannot write /proc/x/y"),
        (["compress", "{run}", "--out", "{run}/record.json"], "ending in .safetensors"),
    ],
)
def test_bad_input_is_one_line(argv, message, run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("STOKER_RUNS_DIR", str(tmp_path / "empty"))
    code = stoker.cli.main([a.format(run=run_dir) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1


def test_a_corrupt_checkpoint_is_refused(run_dir, capsys):
    weights = run_dir / "checkpoints" / "step-00000010" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    assert stoker.cli.main(["compress", str(run_dir / "checkpoints" / "step-00000010")]) == 2
    assert "failed verification" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_experiment_writes_report_and_plots(tmp_path):
    out = tmp_path / "report"
    argv = ["experiment", "train-large-then-compress", "--quick", "--sizes", "tiny,mini"]
    assert stoker.cli.main([*argv, "--out", str(out)]) == 0
    text = (out / "README.md").read_text()
    assert "Larger model better at equal training time" in text
    assert "| tiny | ffn-50% + int8 |" in text and "| mini | int8 |" in text
    for png in ("training.png", "compression.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "results.json").read_text())["results"]
    assert [r["name"] for r in results] == ["tiny", "mini"]
