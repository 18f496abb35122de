"""The few collectives a multi-process checkpoint needs, on a CPU (gloo) group.

Saving under ``torch.distributed`` is a small protocol: rank 0 prepares the temporary
directory, every rank writes its files, all ranks agree everything succeeded, rank 0 writes
the manifest and renames. The agreement runs on a gloo group even when training uses NCCL, so
it needs no device tensors (no host-device sync) and may run on a background thread without
interleaving with the training's collectives on the default group. The group times out after
``$STOKER_COLLECTIVE_TIMEOUT`` seconds: a rank that died or never comes makes the others raise
:class:`~stoker.runtime.distributed.CollectiveTimeout` naming it, never wait for ever.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from stoker.runtime.distributed import CollectiveTimeout, collective_timeout, control_group

__all__ = ["Coordinator"]


class Coordinator:
    """Rank, world size and agreement collectives; trivial when not distributed.

    Create it on every rank at the same point (creating the gloo group is itself collective).
    """

    def __init__(self) -> None:
        self.enabled = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.enabled else 0
        self.world_size = dist.get_world_size() if self.enabled else 1
        self._group: Any = None
        if self.enabled:
            # Our own group even when training uses gloo: a background save's collectives must
            # not interleave with the training loop's on the default group.
            self._group = control_group("a checkpoint's setup (creating its gloo group)")

    def _bounded(self, what: str, collective: Callable[..., Any], *args: Any, **kw: Any) -> None:
        try:
            collective(*args, group=self._group, **kw)
        except RuntimeError as exc:  # gloo: timed out, or the connection to a dead peer closed
            raise CollectiveTimeout.from_error(what, exc, collective_timeout()) from exc

    def all_ok(self, ok: bool) -> bool:
        """True on every rank iff ``ok`` was true on every rank (also a barrier)."""
        if not self.enabled:
            return ok
        flag = torch.tensor([1 if ok else 0], dtype=torch.int64)
        self._bounded("a checkpoint's agreement", dist.all_reduce, flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def any_true(self, value: bool) -> bool:
        """True on every rank iff ``value`` was true on some rank."""
        if not self.enabled:
            return value
        flag = torch.tensor([1 if value else 0], dtype=torch.int64)
        self._bounded("a checkpoint's agreement", dist.all_reduce, flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def broadcast_int(self, value: int) -> int:
        """Rank 0's ``value`` on every rank."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        self._bounded("a checkpoint's agreement", dist.broadcast, t, src=0)
        return int(t.item())
