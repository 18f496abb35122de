"""Warn once when every process trains on the same data.

A loop that feeds its own tensors (``torch.randint`` batches, a tensor sliced by hand) and runs
on several processes gives each rank *the same* batches unless it shards them itself: the job
does ``world_size`` times the work for the statistics of one process, silently. A prepared
DataLoader is sharded; everything else is the loop's business, so stoker checks once: the
first training forward of the prepared model reduces its input tensors to a few numbers (on
the device, no sync; a forward under ``no_grad`` or ``eval()`` is an evaluation, where every
rank may rightly see the same batch), and the first ``backward()`` all-gathers them (one small
collective, once per run). If every rank fed the same numbers, the main rank warns, saying how
to shard.

Fingerprint of the inputs ``x_1 .. x_n`` (flattened, as float64), worked for one input
``[1, 2, 3]``: ``[tensors, elements, sum(x), sum(x^2), sum(i * x_i)]`` = ``[1, 3, 6, 14, 14]``
(``i`` counts from 1, so a permutation of the same batch differs).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.hooks import RemovableHandle

from stoker.runtime.nested import map_tensors

__all__ = ["SameDataCheck", "SameDataWarning", "fingerprint"]


class SameDataWarning(UserWarning):
    """Every process fed the model the same first batch."""


def fingerprint(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """``[tensors, elements, sum, sum of squares, position-weighted sum]`` (float64, on
    ``device``); see the module docstring."""
    out = torch.zeros(5, dtype=torch.float64, device=device)
    out[0] = len(tensors)
    for t in tensors:
        x = t.detach().reshape(-1).to(device=device, dtype=torch.float64)
        i = torch.arange(1, x.numel() + 1, dtype=torch.float64, device=device)
        out[1:] += torch.stack([x.new_tensor(x.numel()), x.sum(), (x * x).sum(), (x * i).sum()])
    return out


class SameDataCheck:
    """Fingerprints the first forward's inputs of ``module``; :meth:`check` compares ranks."""

    def __init__(self, module: nn.Module, device: torch.device) -> None:
        self.device = device
        self.value: torch.Tensor | None = None
        self._handle: RemovableHandle | None = module.register_forward_pre_hook(
            self._first_forward, with_kwargs=True
        )

    def _first_forward(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return  # an evaluation: every rank may rightly see the same validation batch
        found: list[torch.Tensor] = []

        def collect(t: torch.Tensor) -> torch.Tensor:
            found.append(t)
            return t

        map_tensors(collect, (args, kwargs))
        inputs = [t for t in found if t.numel() > 0]
        self.value = fingerprint(inputs, self.device)
        self.remove()

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def check(self, rank: int, world_size: int) -> None:
        """All-gather the fingerprints (every rank calls this at its first ``backward()``)."""
        self.remove()
        mine = self.value
        if mine is None:  # no forward of the prepared model before this backward, on any rank
            return
        parts = [torch.empty_like(mine) for _ in range(world_size)]
        dist.all_gather(parts, mine)
        same = all(torch.equal(p, parts[0]) for p in parts[1:])
        if same and rank == 0:
            warnings.warn(
                f"all {world_size} processes fed the model the same first batch: each rank "
                "trains on the same data, doing the work of one process "
                f"{world_size} times. Shard it: pass your DataLoader to stoker.prepare() (it "
                "gets a per-rank sampler), or take this rank's part yourself, e.g. "
                "data[stoker.rank :: stoker.world_size], or give each rank its own generator "
                "(torch.Generator().manual_seed(seed + stoker.rank)) for sampled batches",
                SameDataWarning,
                stacklevel=4,
            )
