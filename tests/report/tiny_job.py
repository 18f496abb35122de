"""A tiny stoker loop that leaves a real run directory for the report tests.

python tiny_job.py --steps 40 [--lr 0.05] [--die-at N] [--doctor]

Logs loss, lr and tokens/s every step and val_loss every 10 steps, checkpoints every 10 steps.
``--die-at N`` kills the process (SIGKILL) at step N, so running it again with the same
``$STOKER_RUN_DIR`` resumes: the record then has a second attempt with ``resumed_from``.
"""

import argparse
import os
import signal
import time

import torch
import torch.nn.functional as F

from stoker import Stoker
from stoker.doctor import DoctorConfig

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=40)
parser.add_argument("--lr", type=float, default=0.05)
parser.add_argument("--die-at", type=int, default=None)
parser.add_argument("--doctor", action="store_true")
args = parser.parse_args()

doctor = DoctorConfig(warmup_steps=2, window_steps=3, attribution_steps=1, probes=False)
stoker = Stoker(
    device="cpu",
    precision="fp32",
    seed=0,
    config=args,
    checkpoint=10,
    doctor=doctor if args.doctor else False,
)
model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
model, optimizer = stoker.prepare(model, optimizer)
g = torch.Generator().manual_seed(0)
x, xv = torch.randn(2048, 8, generator=g), torch.randn(256, 8, generator=g)
y, yv = x[:, :2].sum(dim=1, keepdim=True), xv[:, :2].sum(dim=1, keepdim=True)
while stoker.step < args.steps:
    t = time.perf_counter()
    i = (stoker.step * 32) % 2048
    loss = F.mse_loss(model(x[i : i + 32]), y[i : i + 32])
    stoker.backward(loss)
    optimizer.step()
    optimizer.zero_grad()
    stoker.log(
        {"loss": loss.detach(), "lr": args.lr, "tokens_per_s": 32 / (time.perf_counter() - t)}
    )
    if stoker.step % 10 == 0:
        with torch.no_grad():
            stoker.log({"val_loss": F.mse_loss(model(xv), yv)})
    if args.die_at is not None and stoker.step == args.die_at:
        stoker.print("dying", flush=True)
        time.sleep(1.5)  # the metrics thread writes every second
        os.kill(os.getpid(), signal.SIGKILL)
stoker.close()
