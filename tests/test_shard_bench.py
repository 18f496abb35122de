"""The memory accounting of ``benchmarks/shard.py`` (the script itself is a benchmark)."""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

_PATH = Path(__file__).parents[1] / "benchmarks" / "shard.py"
_spec = importlib.util.spec_from_file_location("shard_bench", _PATH)
assert _spec is not None and _spec.loader is not None
shard_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(shard_bench)  # main() is behind __name__ == "__main__": nothing runs


def test_state_bytes_counts_each_storage_once() -> None:
    model = nn.Linear(10, 6)  # 66 fp32 parameters in 2 tensors
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 10)).sum().backward()
    optimizer.step()
    counted = shard_bench.state_bytes(model, optimizer)
    # AdamW: exp_avg and exp_avg_sq per parameter, plus a 0-d fp32 step per tensor.
    assert counted == {"params": 264, "grads": 264, "optimizer": 528 + 8, "total": 1064}
    # Gradients that are views of one buffer (DDP's buckets) count as that buffer, once.
    flat = torch.zeros(70)
    model.weight.grad, model.bias.grad = flat[:60].view(6, 10), flat[60:66]
    assert shard_bench.state_bytes(model, optimizer)["grads"] == 280


def test_largest_fit_doubles_then_bisects(monkeypatch, tmp_path) -> None:
    widths = []

    def fake_torchrun(args, extra, out):  # peak RSS grows with the width: fits up to 700 wide
        width = int(extra[extra.index("--width") + 1])
        widths.append(width)
        return {"peak_rss_mb": [300 + width / 2, 300.0], "parameters": width}

    monkeypatch.setattr(shard_bench, "torchrun", fake_torchrun)
    args = SimpleNamespace(budget_mb=650.0, width_step=64, max_width=4096, max_trials=12)
    found = shard_bench.largest_fit(args, "ddp", tmp_path)
    assert widths == [64, 128, 256, 512, 1024, 768, 640, 704]
    assert found["width"] == 640 and not found["capped"] and found["peak_rss_mb"] == 620
    args.max_width = 256  # every width up to the cap fits
    assert shard_bench.largest_fit(args, "ddp", tmp_path)["capped"]
