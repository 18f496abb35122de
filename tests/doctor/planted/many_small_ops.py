"""Planted many-small-ops: a Python loop over batch rows. `--clean`: one broadcast multiply."""

import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

from stoker.runtime import bf16_is_fast

CLEAN = "--clean" in sys.argv
BF16 = bf16_is_fast("cpu")  # compute in the precision this machine is fast at
torch.manual_seed(0)


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(256, 1024)
        self.out = nn.Linear(1024, 256)
        self.gate = nn.Parameter(torch.ones(1024))

    def forward(self, x):
        h = F.gelu(self.inp(x))
        if CLEAN:
            return self.out(h * self.gate)
        h = torch.stack([row * self.gate for row in h])  # PLANTED
        return self.out(h)


data = TensorDataset(torch.randn(4096, 256), torch.randn(4096, 256))
loader = DataLoader(data, sampler=BatchSampler(RandomSampler(data), 512, True), batch_size=None)
model = Gated()
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
for _epoch in range(10):
    for x, y in loader:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=BF16):
            loss = F.mse_loss(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
