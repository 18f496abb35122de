"""Planted fp32-matmul or bf16-matmul: matrix products in the precision this machine is slow at.

Where bf16 is fast (AMX, AVX512-BF16) the planted twin runs fp32; where bf16 is emulated
(AVX2-only CPUs) it runs bf16, at a smaller size so a step stays short. `--clean`: the fast one.
"""

import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

from stoker.runtime import bf16_is_fast

CLEAN = "--clean" in sys.argv
BF16 = bf16_is_fast("cpu")
USE_BF16 = BF16 if CLEAN else not BF16
WIDTH, BATCH = (2048, 512) if BF16 else (512, 128)
torch.manual_seed(0)
data = TensorDataset(torch.randn(4096, 256), torch.randn(4096, 256))
loader = DataLoader(data, sampler=BatchSampler(RandomSampler(data), BATCH, True), batch_size=None)
model = nn.Sequential(nn.Linear(256, WIDTH), nn.GELU(), nn.Linear(WIDTH, 256))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
for _epoch in range(10):
    for x, y in loader:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=USE_BF16):
            out = model(x)  # PLANTED
            loss = F.mse_loss(out.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
