"""A nanoGPT-style job for the resume tests (not a test module itself).

No DataLoader and no ``accumulate()``: each iteration draws its batch with ``torch.randint``
from the global generator (nanoGPT's ``get_batch``), every few steps estimates the loss on
batches drawn the same way, and the model has dropout (the RNG again) and batch norm (buffers
moved by every forward). Checkpoints every ``--every`` steps; ``--max-iters`` steps in all.

    python tests/runtime/randint_job.py --max-iters 20 --every 3
"""

import argparse
import math

import torch
import torch.nn.functional as F
from torch import nn

from stoker import Stoker
from stoker.checkpoint import CheckpointConfig

parser = argparse.ArgumentParser()
parser.add_argument("--max-iters", type=int, default=20)
parser.add_argument("--every", type=int, default=3)
parser.add_argument("--eval-interval", type=int, default=5)
args = parser.parse_args()
torch.set_num_threads(1)

stoker = Stoker(
    device="cpu", precision="fp32", seed=1, checkpoint=CheckpointConfig(every_steps=args.every)
)
vocab, block_size, batch_size = 40, 8, 6
data = torch.randint(0, vocab, (2000,), generator=torch.Generator().manual_seed(0))
model = nn.Sequential(
    nn.Embedding(vocab, 16),
    nn.Flatten(),
    nn.Linear(16 * block_size, 32),
    nn.BatchNorm1d(32),
    nn.GELU(),
    nn.Dropout(0.2),
    nn.Linear(32, vocab),
)
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
scheduler = torch.optim.lr_scheduler.LambdaLR(
    optimizer, lambda it: 0.5 * (1 + math.cos(math.pi * it / args.max_iters))
)
model, optimizer, scheduler = stoker.prepare(model, optimizer, scheduler=scheduler)


def get_batch():
    ix = torch.randint(len(data) - block_size - 1, (batch_size,))
    x = torch.stack([data[i : i + block_size] for i in ix])
    return x.to(stoker.device), data[ix + block_size].to(stoker.device)


@torch.no_grad()
def estimate_loss():
    model.eval()
    losses = [F.cross_entropy(model(x), y) for x, y in (get_batch() for _ in range(2))]
    model.train()
    return torch.stack(losses).mean()


while stoker.step < args.max_iters:
    if stoker.step % args.eval_interval == 0:
        stoker.log({"val": estimate_loss()})
    x, y = get_batch()
    loss = F.cross_entropy(model(x), y)
    stoker.backward(loss)
    stoker.clip_grad_norm_(1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    stoker.log({"loss": loss})
