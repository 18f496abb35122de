"""The memory accounting of ``benchmarks/shard.py`` (the script itself is a benchmark)."""

import importlib.util
from pathlib import Path

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
