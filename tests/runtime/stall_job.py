"""Run by test_distributed.py as 2 processes: one rank never reaches a collective (no tests here).

    python stall_job.py STALL_RANK {barrier,checkpoint,wait,tokens}

Both ranks train 2 DDP steps. Rank STALL_RANK then sleeps instead of going on; the other one
either ends the run (``barrier``: without a run directory, so close() has no final checkpoint
to agree on and goes straight to its barrier), saves a checkpoint (the ranks' agreement),
calls ``stoker.wait_for_everyone()`` (``wait``) or ``TokenCounter.summary()`` (``tokens``).
"""

import sys
import time

import torch

from stoker import Stoker
from stoker.data import TokenCounter

stall_rank, at = int(sys.argv[1]), sys.argv[2]
stoker = Stoker(device="cpu", precision="fp32", seed=0, doctor=False, record=at == "checkpoint")
model = torch.nn.Linear(4, 1)
model, optimizer = stoker.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
tokens = TokenCounter()
for _ in range(2):
    stoker.backward(model(torch.randn(8, 4)).square().mean())
    optimizer.step()
    optimizer.zero_grad()
    tokens.update(torch.ones(8, 4, dtype=torch.bool))
if stoker.rank == stall_rank:
    time.sleep(600)  # stuck elsewhere: the test kills it
print(f"waiting from {time.time()}", flush=True)
if at == "checkpoint":
    stoker.save_checkpoint()
elif at == "wait":
    stoker.wait_for_everyone()
elif at == "tokens":
    tokens.summary()
