"""Planted host-sync: `.item()` on every step. `--clean`: keep the loss on the device."""

import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

from stoker.runtime import bf16_is_fast

CLEAN = "--clean" in sys.argv
BF16 = bf16_is_fast("cpu")  # compute in the precision this machine is fast at
torch.manual_seed(0)
data = TensorDataset(torch.randn(4096, 256), torch.randn(4096, 256))
loader = DataLoader(data, sampler=BatchSampler(RandomSampler(data), 512, True), batch_size=None)
model = nn.Sequential(nn.Linear(256, 2048), nn.GELU(), nn.Linear(2048, 256))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
losses = []
for _epoch in range(10):
    for x, y in loader:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=BF16):
            loss = F.mse_loss(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if CLEAN:
            losses.append(loss.detach())
        else:
            losses.append(loss.item())  # PLANTED
