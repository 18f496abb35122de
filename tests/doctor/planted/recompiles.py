"""Planted recompiles: a changing Python float with dynamic=False. `--clean`: pass a tensor."""

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


def forward_loss(x, y, scale):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=BF16):
        return F.mse_loss(model(x).float(), y) * scale


compiled = torch.compile(forward_loss, backend="eager", dynamic=False)  # PLANTED
step = 0
for _epoch in range(10):
    for x, y in loader:
        scale = 0.99**step
        loss = compiled(x, y, torch.tensor(scale) if CLEAN else scale)
        loss.backward()
        opt.step()
        opt.zero_grad()
        step += 1
