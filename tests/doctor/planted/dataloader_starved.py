"""Planted dataloader-starved: a per-sample Python transform in __getitem__, no workers.

`--clean`: the same transform vectorised over the batch (one call per batch).
"""

import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

from stoker.runtime import bf16_is_fast

CLEAN = "--clean" in sys.argv
BF16 = bf16_is_fast("cpu")  # compute in the precision this machine is fast at
torch.manual_seed(0)


class Noisy(Dataset):
    def __init__(self) -> None:
        self.x, self.y = torch.randn(4096, 256), torch.randn(4096, 256)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        x = self.x[i]
        for _ in range(2):  # an augmentation: one sample at a time when i is an int
            x = x + 0.01 * torch.sin(x)
        return x, self.y[i]


data = Noisy()
if CLEAN:
    loader = DataLoader(data, sampler=BatchSampler(RandomSampler(data), 512, True), batch_size=None)
else:
    loader = DataLoader(data, batch_size=512, shuffle=True)  # PLANTED
model = nn.Sequential(nn.Linear(256, 2048), nn.GELU(), nn.Linear(2048, 256))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
for _epoch in range(10):
    for x, y in loader:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=BF16):
            loss = F.mse_loss(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
