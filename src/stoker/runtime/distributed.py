"""Process groups, DistributedDataParallel and per-rank data shards.

stoker never starts processes itself: ``stoker run`` (or plain ``torchrun``) does, and sets
``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` in each one's environment. This
module reads them, joins the process group (gloo on CPU, nccl on CUDA) and leaves everything
else to ``torch.distributed``.

Every collective stoker adds outside the training step (the barrier at the end of the run, a
checkpoint's agreements, :meth:`Stoker.wait_for_everyone`, ``TokenCounter.summary``) runs on a
gloo group created with a timeout of
``$STOKER_COLLECTIVE_TIMEOUT`` seconds (default 300): when a rank died or is stuck elsewhere,
the others stop with one line naming it (:class:`CollectiveTimeout`) and a non-zero exit, which
torchrun's elastic agent sees as a failure (and restarts, with ``--max-restarts``), instead of
waiting for ever.
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from stoker.errors import StokerError

__all__ = [
    "COLLECTIVE_TIMEOUT_ENV",
    "CollectiveTimeout",
    "DistributedContext",
    "barrier",
    "collective_timeout",
    "control_group",
    "init_distributed",
    "is_rank_aware",
    "shard_loader",
    "wait_for_ranks",
]

COLLECTIVE_TIMEOUT_ENV = "STOKER_COLLECTIVE_TIMEOUT"
_DEFAULT_TIMEOUT_S = 300.0


class CollectiveTimeout(StokerError):
    """A rank did not reach one of stoker's own collectives within the collective timeout."""

    @classmethod
    def from_error(cls, what: str, error: BaseException, timeout_s: float) -> CollectiveTimeout:
        """Explain ``error``, raised by torch.distributed while waiting in ``what``."""
        rank, world = dist.get_rank(), dist.get_world_size()
        # torch's message, on one line without its source location: "[file.cc:78] Timed out..."
        detail = " ".join(re.sub(r"\[[^\]]*\.(?:cpp|cc|h):\d+\] ?", "", str(error)).split())
        listed = re.search(r"Ranks? ([\d, ]+) failed to pass", detail)  # monitored_barrier's
        if world == 2:
            who = f"rank {1 - rank}"
        elif rank == 0 and listed:
            who = f"rank(s) {listed.group(1).strip()}"
        else:
            who = "another rank"
        return cls(
            f"rank {rank}: {who} did not reach {what} within {timeout_s:g} s "
            f"({COLLECTIVE_TIMEOUT_ENV}={timeout_s:g}; torch.distributed: {detail[:300]}); it "
            "died or is stuck elsewhere: see its own output, or raise "
            f"{COLLECTIVE_TIMEOUT_ENV} if it is only slow"
        )


def collective_timeout() -> float:
    """Seconds stoker's own collectives wait for every rank: ``$STOKER_COLLECTIVE_TIMEOUT``."""
    value = os.environ.get(COLLECTIVE_TIMEOUT_ENV, "")
    if not value:
        return _DEFAULT_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise StokerError(
            f"environment variable {COLLECTIVE_TIMEOUT_ENV}={value!r} is not a number of "
            f"seconds; use a positive number such as {_DEFAULT_TIMEOUT_S:g} (the default)"
        )
    return seconds


def control_group(what: str) -> Any:
    """A new gloo group over every rank whose collectives time out (see the module docstring).

    Collective itself: every rank must create it at the same point of the program.
    """
    timeout_s = collective_timeout()
    try:
        return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    except RuntimeError as exc:  # DistStoreError: a rank never came to create it
        raise CollectiveTimeout.from_error(what, exc, timeout_s) from exc


def wait_for_ranks(group: Any, what: str) -> None:
    """A barrier over ``group`` (from :func:`control_group`) that fails rather than hangs."""
    timeout_s = collective_timeout()
    try:
        # Rank 0 waits for each rank with this timeout and names the missing ones; the others
        # wait for rank 0 with the group's.
        dist.monitored_barrier(
            group=group, timeout=datetime.timedelta(seconds=timeout_s), wait_all_ranks=True
        )
    except RuntimeError as exc:
        raise CollectiveTimeout.from_error(what, exc, timeout_s) from exc


def barrier(ctx: DistributedContext, what: str) -> None:
    """Wait for every rank of ``ctx`` (nothing with one process); on stoker's own group, for
    at most the collective timeout (:func:`wait_for_ranks`). A process group the user created
    keeps the timeout the user gave it: stoker has no group of its own there."""
    if not ctx.enabled:
        return
    if ctx.group is not None:
        wait_for_ranks(ctx.group, what)
    else:
        dist.barrier()


@dataclass(frozen=True, slots=True)
class DistributedContext:
    """Where this process sits in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    owns_group: bool = False
    """Whether stoker created the process group (and so destroys it at the end)."""
    group: Any = field(default=None, compare=False)
    """With ``owns_group``: a :func:`control_group` for the barrier at the end of the run."""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise StokerError(f"environment variable {name}={value!r} is not an integer") from exc


def _attempt_store(timeout: datetime.timedelta | None) -> dict[str, Any]:
    """Under torchrun's elastic agent: its store, with keys private to this restart attempt.

    The workers of every attempt share the agent's one TCPStore and the default group writes
    each rank's address under the same keys, so after a restart a rank can read the address a
    dead rank of the previous attempt left there and wait on it: a gloo connect seen stalling
    on both ranks. A prefix per attempt keeps each attempt's keys apart.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if attempt is None or not agent_store or "MASTER_ADDR" not in os.environ:
        return {}
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        _env_int("MASTER_PORT", 29500),
        is_master=False,
        timeout=timeout or datetime.timedelta(minutes=30),
    )
    return {
        "store": dist.PrefixStore(f"stoker/attempt-{attempt}/", store),
        "rank": _env_int("RANK", 0),
        "world_size": _env_int("WORLD_SIZE", 1),
    }


def init_distributed(device: torch.device) -> DistributedContext:
    """Join the process group described by torchrun's environment variables, if any."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size <= 1:
        return DistributedContext()
    if not dist.is_available():
        raise StokerError(
            f"WORLD_SIZE={world_size} but this torch build has no torch.distributed; "
            "run a single process or install a torch build with distributed support"
        )
    owns_group = not dist.is_initialized()
    if owns_group:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # Joining can stall (a gloo full-mesh connect after an elastic restart was seen
        # waiting here on both ranks). With $STOKER_COLLECTIVE_TIMEOUT set, the join and every
        # collective of the default group, the step's included, are bounded by it; unset, torch's
        # defaults stand (30 min for gloo): a long rank-0-only evaluation must not fail a run.
        timeout = (
            datetime.timedelta(seconds=collective_timeout())
            if os.environ.get(COLLECTIVE_TIMEOUT_ENV)
            else None
        )
        try:
            dist.init_process_group(backend=backend, timeout=timeout, **_attempt_store(timeout))
        except (RuntimeError, dist.DistBackendError) as exc:  # e.g. gloo's connect timed out
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else repr(exc)
            raise StokerError(
                f"rank {rank} could not join the process group ({first}); under `stoker run "
                "--max-restarts N` the agent restarts the workers"
            ) from None
    return DistributedContext(
        rank=rank,
        local_rank=local_rank,
        world_size=world_size,
        owns_group=owns_group,
        group=control_group("the start of the run (Stoker())") if owns_group else None,
    )


def is_rank_aware(loader: DataLoader[Any]) -> bool:
    """Whether ``loader``'s sampler or batch sampler splits the data by rank itself."""
    for sampler in (loader.batch_sampler, loader.sampler):
        if hasattr(sampler, "num_replicas") and hasattr(sampler, "rank"):
            return True
    return False


def shard_loader(loader: DataLoader[Any], ctx: DistributedContext, seed: int) -> DataLoader[Any]:
    """Give this rank its shard of ``loader``'s dataset.

    A loader whose sampler or batch sampler already knows its rank (has ``num_replicas`` and
    ``rank``, like ``DistributedSampler`` or stoker's balanced samplers) is returned as is.
    A loader with the default sequential or random sampler is rebuilt with a
    ``DistributedSampler`` keeping its shuffle setting; rank r then sees samples r, r+W, r+2W …
    of the order one process would see, so a global batch of W x B equals one process's batch
    of W x B. Anything else is refused rather than silently duplicated on every rank.
    """
    for part in (loader.batch_sampler, loader.sampler):
        replicas = getattr(part, "num_replicas", None)
        if replicas is not None and hasattr(part, "rank") and replicas != ctx.world_size:
            raise StokerError(
                f"the loader's {type(part).__name__} splits data over num_replicas={replicas} "
                f"but this job has {ctx.world_size} process(es); build it after creating the "
                "Stoker (so it sees the process group) or pass num_replicas=stoker.world_size"
            )
    if not ctx.enabled or is_rank_aware(loader):
        return loader
    if isinstance(loader.sampler, SequentialSampler | RandomSampler) and loader.batch_size:
        shuffle = isinstance(loader.sampler, RandomSampler)
        sampler: DistributedSampler[Any] = DistributedSampler(
            loader.dataset,
            num_replicas=ctx.world_size,
            rank=ctx.rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=loader.drop_last,
        )
        return DataLoader(
            loader.dataset,
            batch_size=loader.batch_size,
            sampler=sampler,
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory,
            drop_last=loader.drop_last,
            timeout=loader.timeout,
            worker_init_fn=loader.worker_init_fn,
            multiprocessing_context=loader.multiprocessing_context,
            generator=loader.generator,
            prefetch_factor=loader.prefetch_factor if loader.num_workers > 0 else None,
            persistent_workers=loader.persistent_workers,
        )
    raise StokerError(
        f"cannot shard a DataLoader whose sampler is {type(loader.sampler).__name__} and batch "
        f"sampler is {type(loader.batch_sampler).__name__} across {ctx.world_size} processes; "
        "give it a sampler with `num_replicas` and `rank` (e.g. torch's DistributedSampler or "
        "a stoker balanced sampler) or use the default sampler with batch_size set"
    )
