"""A tiny deterministic training job for the exact-resume tests (not a test module itself).

Uses stoker.checkpoint directly: checkpoints every --every steps into
$STOKER_RUN_DIR/checkpoints, resumes from the newest valid one, saves a final checkpoint,
appends {"step", "loss"} lines to $STOKER_RUN_DIR/metrics.jsonl. Draws from every RNG a real
loop draws from (dropout: torch; noise: NumPy; augmentation: Python's random) and shuffles data
with a resumable sampler, so a resume is bitwise exact only if all of them are restored.
Under torchrun (WORLD_SIZE=2) it trains with DDP on gloo, each rank on its shard.

    python tests/checkpoint/resume_job.py --steps 30 --every 7
    STOKER_FAULT_KILL_AT_STEP=12 python tests/checkpoint/resume_job.py ...   # dies at step 12
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from stoker.checkpoint import CheckpointConfig, Checkpointer


class EpochSampler:
    """Indices of a per-epoch seeded permutation, this rank's share; resumable mid-epoch."""

    def __init__(self, n: int, seed: int, rank: int, world: int) -> None:
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.epoch, self.position = 0, 0

    def next_batch(self, batch: int) -> list[int]:
        out = []
        while len(out) < batch:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g)[self.rank :: self.world].tolist()
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
                continue
            take = order[self.position : self.position + batch - len(out)]
            self.position += len(take)
            out += take
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--every", type=int, default=7)
    parser.add_argument("--async-save", action="store_true")
    parser.add_argument("--forget-sampler", action="store_true", help="a deliberately bad resume")
    parser.add_argument(
        "--fast-start",
        action="store_true",
        help="skip torch.use_deterministic_algorithms (it imports the compiler stack: ~2 s); "
        "the CPU kernels used here are deterministic either way",
    )
    args = parser.parse_args()

    if not args.fast_start:
        torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    run_dir = Path(os.environ.get("STOKER_RUN_DIR", "runs/resume-job"))
    torch.manual_seed(1234 + rank)
    np.random.seed(99 + rank)
    random.seed(7 + rank)

    data_x = torch.randn(96, 16, generator=torch.Generator().manual_seed(0))
    data_y = torch.randint(0, 4, (96,), generator=torch.Generator().manual_seed(1))
    model: nn.Module = nn.Sequential(
        nn.Linear(16, 32), nn.GELU(), nn.Dropout(0.2), nn.Linear(32, 4)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model)
    sampler = EpochSampler(len(data_x), seed=5, rank=rank, world=world)
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    if not args.forget_sampler:
        state["sampler"] = sampler
    ckpt = Checkpointer(
        run_dir / "checkpoints",
        CheckpointConfig(every_steps=args.every, keep_last=2, async_save=args.async_save),
    )
    start = ckpt.resume(state) or 0
    metrics = open(run_dir / "metrics.jsonl", "a") if rank == 0 else None  # noqa: SIM115
    for step in range(start + 1, args.steps + 1):
        idx = sampler.next_batch(8)
        x = data_x[idx] + torch.from_numpy(np.random.normal(0, 0.01, (8, 16))).float()
        if random.random() < 0.5:  # a Python-RNG augmentation
            x = x.flip(-1)
        loss = F.cross_entropy(model(x), data_y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        if metrics is not None:
            metrics.write(json.dumps({"step": step, "loss": loss.item()}) + "\n")
            metrics.flush()
        ckpt.maybe_save(step, state)
    ckpt.save(args.steps, state)
    ckpt.close()
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
