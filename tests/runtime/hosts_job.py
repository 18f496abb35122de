"""Run by test_two_hosts.py on each host under `stoker run --nnodes ...` (and once on one host).

Trains STEPS steps of a small shuffled AdamW regression with a checkpoint every 3, sleeping
$STEP_SECONDS (default 0) after each step of a run not resumed, so that a test can kill a host
mid-run (a resumed run goes at full speed). Every worker
start appends "<host interface> restart=<n> world=<size> rank=<rank>" to OUT.log (the hosts
share the filesystem); rank 0 writes the final weights, the step it resumed from and the global
mean loss of each step it trained to OUT.
"""

import os
import sys
import time

import torch

from stoker import Stoker
from stoker.checkpoint import CheckpointConfig

STEPS = 24
out = sys.argv[1]
pause = float(os.environ.get("STEP_SECONDS", "0"))
with open(out + ".log", "a") as log:
    host = os.environ.get("GLOO_SOCKET_IFNAME", "local")
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    print(
        f"{host} restart={restart} world={os.environ['WORLD_SIZE']} rank={os.environ['RANK']}",
        file=log,
        flush=True,
    )
torch.use_deterministic_algorithms(True)
stoker = Stoker(device="cpu", precision="fp32", seed=0, checkpoint=CheckpointConfig(every_steps=3))
g = torch.Generator().manual_seed(0)
data = torch.utils.data.TensorDataset(
    torch.randn(48, 8, generator=g), torch.randn(48, 1, generator=g)
)
loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
model, optimizer, loader = stoker.prepare(model, optimizer, loader)
losses = {}
if stoker.resumed_from is not None:
    pause = 0.0
while stoker.step < STEPS:
    for x, y in loader:
        loss = torch.nn.functional.mse_loss(model(x), y)
        stoker.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses[stoker.step] = stoker.reduce(loss.detach(), "mean")
        time.sleep(pause)
        if stoker.step == STEPS:
            break
if stoker.is_main:
    weights = {k: v.detach().clone() for k, v in stoker.unwrap(model).state_dict().items()}
    result = {"resumed_from": stoker.resumed_from, "weights": weights, "losses": losses}
    torch.save(result, out)
