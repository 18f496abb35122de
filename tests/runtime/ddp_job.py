"""A training job run by test_ddp.py: once under `stoker run --nproc 2`, once as one process.

Writes the per-step global loss and the final weights to OUT (a .pt file, rank 0 only).
With --accumulate, uses 2 micro-batches per step and token-weighted losses whose token counts
differ between ranks and micro-batches.
"""

import argparse

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from stoker import Stoker

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--batch", type=int, required=True, help="per-process batch size")
parser.add_argument("--accumulate", action="store_true")
args = parser.parse_args()

torch.use_deterministic_algorithms(True)
k = 2 if args.accumulate else 1
stoker = Stoker(device="cpu", precision="fp32", accumulation_steps=k, seed=0)
g = torch.Generator().manual_seed(0)
x = torch.randn(64, 6, 8, generator=g)
y = torch.randint(0, 5, (64, 6), generator=g)
valid = torch.rand(64, 6, generator=g) < torch.linspace(0.1, 1.0, 64)[:, None]
valid[:, 0] = True
data = DataLoader(TensorDataset(x, y, valid), batch_size=args.batch, shuffle=False)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5))
optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
model, optimizer, data = stoker.prepare(model, optimizer, data)

losses = []
total = torch.zeros(())
for xb, yb, vb in data:
    with stoker.accumulate(model):
        per_token = F.cross_entropy(model(xb).flatten(0, 1), yb.flatten(), reduction="none")
        n = vb.sum()
        loss = (per_token * vb.flatten()).sum() / n
        stoker.backward(loss, tokens=n)
        optimizer.step()
        optimizer.zero_grad()
        total = total + stoker.reduce(loss.detach() * n, "sum")
        tokens = stoker.reduce(n.float(), "sum")
    if stoker.sync_gradients:
        losses.append(total)
        total = torch.zeros(())
if stoker.is_main:
    weights = {k: v.detach().clone() for k, v in stoker.unwrap(model).state_dict().items()}
    torch.save({"losses": torch.stack(losses), "weights": weights, "steps": stoker.step}, args.out)
