"""A stoker job whose DataLoader has worker processes, for the exact-resume test (no tests here).

Checkpoints every --every steps through the runtime; the dataset draws noise from torch's RNG
inside the workers, and the model has dropout, so a resume is bitwise exact only if nothing but
the main process writes checkpoints and every generator comes back as it was.

    python tests/runtime/workers_job.py --steps 30 --every 4 --workers 2
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from stoker import Stoker
from stoker.checkpoint import CheckpointConfig


class NoisyData(Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(96, 16, generator=g)
        self.y = torch.randint(0, 4, (96,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i] + 0.01 * torch.randn(16), self.y[i]  # the worker's own generator


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(1)
    stoker = Stoker(
        device="cpu",
        precision="fp32",
        seed=0,
        checkpoint=CheckpointConfig(every_steps=args.every, keep_last=None),
        doctor=False,
    )
    loader = DataLoader(NoisyData(), batch_size=8, shuffle=True, num_workers=args.workers)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 4)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model, optimizer, loader = stoker.prepare(model, optimizer, loader)
    while stoker.step < args.steps:
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            stoker.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            stoker.log({"loss": loss.detach()})
            if stoker.step >= args.steps:
                break


if __name__ == "__main__":
    main()
