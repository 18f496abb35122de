"""Run by test_elastic.py under `stoker run --max-restarts N`: the first attempt kills itself.

Trains STEPS steps with a checkpoint every 3; on torchrun's first attempt
(TORCHELASTIC_RESTART_COUNT=0) the process of rank $KILL_RANK (default 0) SIGKILLs itself at
step 7. The restarted workers must resume from step 6 with no code here to make them do so.
Rank 0 writes the final weights to OUT.
"""

import os
import signal
import sys

import torch

from stoker import Stoker
from stoker.checkpoint import CheckpointConfig

STEPS = 10
out = sys.argv[1]
first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
kill_rank = int(os.environ.get("KILL_RANK", "0"))
stoker = Stoker(device="cpu", precision="fp32", seed=0, checkpoint=CheckpointConfig(every_steps=3))
data = torch.utils.data.TensorDataset(torch.randn(48, 8), torch.randn(48, 1))
loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
model, optimizer, loader = stoker.prepare(model, optimizer, loader)
while stoker.step < STEPS:
    for x, y in loader:
        killing = first_attempt and stoker.rank == kill_rank and out.endswith("killed.pt")
        if killing and stoker.step == 7:
            os.kill(os.getpid(), signal.SIGKILL)
        loss = torch.nn.functional.mse_loss(model(x), y)
        stoker.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        if stoker.step == STEPS:
            break
if stoker.is_main:
    torch.save({"resumed_from": stoker.resumed_from, **stoker.unwrap(model).state_dict()}, out)
