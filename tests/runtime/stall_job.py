"""Run by test_distributed.py as 2 processes: one rank never reaches a collective (no tests here).

    python stall_job.py STALL_RANK {barrier,checkpoint}

Both ranks train 2 DDP steps. Rank STALL_RANK then sleeps instead of going on; the other one
either ends the run (``barrier``: without a run directory, so close() has no final checkpoint
to agree on and goes straight to its barrier) or saves a checkpoint (the ranks' agreement).
"""

import sys
import time

import torch

from stoker import Stoker

stall_rank, at = int(sys.argv[1]), sys.argv[2]
stoker = Stoker(device="cpu", precision="fp32", seed=0, doctor=False, record=at == "checkpoint")
model = torch.nn.Linear(4, 1)
model, optimizer = stoker.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
for _ in range(2):
    stoker.backward(model(torch.randn(8, 4)).square().mean())
    optimizer.step()
    optimizer.zero_grad()
if stoker.rank == stall_rank:
    time.sleep(600)  # stuck elsewhere: the test kills it
print(f"waiting from {time.time()}", flush=True)
if at == "checkpoint":
    stoker.save_checkpoint()
