"""Run by test_doctor_ddp.py under `stoker run --nproc 2`: a DDP (or, with the argument
``fsdp``, a sharded) loop with the doctor on.

20 steps: past the doctor's default warm-up, profiled window and attribution steps, so rank 0
ends the run with the doctor's report and its probes (no tests here).
"""

import sys

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from stoker import Stoker

strategy = sys.argv[1] if len(sys.argv) > 1 else "auto"
stoker = Stoker(device="cpu", precision="fp32", seed=0, strategy=strategy)
g = torch.Generator().manual_seed(0)
data = TensorDataset(torch.randn(1024, 32, generator=g), torch.randint(0, 10, (1024,), generator=g))
loader = DataLoader(data, batch_size=16, shuffle=True)
model = torch.nn.Sequential(
    torch.nn.Linear(32, 64), torch.nn.BatchNorm1d(64), torch.nn.ReLU(), torch.nn.Linear(64, 10)
)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
model, optimizer, loader = stoker.prepare(model, optimizer, loader)
for x, y in loader:
    loss = F.cross_entropy(model(x), y)
    stoker.backward(loss)
    optimizer.step()
    optimizer.zero_grad()
    if stoker.step == 20:
        break
print(f"rank {stoker.rank} trained {stoker.step} steps", flush=True)
