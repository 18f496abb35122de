"""Run by test_same_data.py under torchrun (2 processes): an evaluation forward on the same
batch everywhere, then steps on tensors fed by hand, the same on every rank, or this rank's
shard with --shard. Rank 0 prints the warnings it got."""

import argparse
import warnings

import torch

from stoker import Stoker

parser = argparse.ArgumentParser()
parser.add_argument("--shard", action="store_true")
args = parser.parse_args()

stoker = Stoker(device="cpu", precision="fp32", seed=0, record=False)
model = torch.nn.Linear(4, 2)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
model, optimizer = stoker.prepare(model, optimizer)
data = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
with torch.no_grad():  # an evaluation on the same batch everywhere first: not a finding
    model(data[:2])
if args.shard:
    data = data[stoker.rank :: stoker.world_size]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for step in range(3):
        stoker.backward(model(data[step * 2 : step * 2 + 2]).square().mean())
        optimizer.step()
        optimizer.zero_grad()
if stoker.is_main:
    for w in caught:
        print(f"WARNING {type(w.message).__name__}: {w.message}")
stoker.close()
