"""The objects :meth:`Stoker.prepare` hands back besides the model (see
:mod:`stoker.runtime.model`): the user's optimizer, scheduler and loaders. Each is a thin shell
around the user's own object that asks the training step (:mod:`stoker.runtime.step`) where in
an accumulation window the loop is.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, RandomSampler

from stoker.runtime.nested import map_tensors
from stoker.runtime.step import TrainingStep

__all__ = ["DataClock", "PreparedLoader", "PreparedOptimizer", "PreparedScheduler", "order_seed"]

_END = object()  # what next() returns once a replayed epoch runs out


def _move(batch: Any, device: torch.device, non_blocking: bool) -> Any:
    """``batch`` on ``device``, every container kept as its own type (see ``map_tensors``)."""
    return map_tensors(lambda t: t.to(device, non_blocking=non_blocking), batch)


def order_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s data order. A ``DistributedSampler`` seeds itself with
    ``its seed + epoch``: built with ``order_seed(seed, 0)`` it shuffles each epoch exactly as
    one process does, so W processes split the very order one process sees."""
    return (seed * 1_000_003 + epoch) % 2**63


class DataClock:
    """What the prepared loaders of a run count for the meters: seconds spent waiting in a
    fetch (``next()`` on the user's loader) and samples fetched (batches x batch size)."""

    __slots__ = ("samples", "wait")

    def __init__(self) -> None:
        self.wait = 0.0
        self.samples = 0


class PreparedOptimizer(torch.optim.Optimizer):
    """The user's optimizer, stepping only when gradients are complete.

    Under :meth:`Stoker.accumulate`, ``step()`` and ``zero_grad()`` are no-ops on non-final
    micro-batches, so the loop body stays the same with or without accumulation. Subclasses
    ``Optimizer`` (without calling its ``__init__``) so LR schedulers accept it.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, steps: TrainingStep) -> None:
        self.optimizer = optimizer
        self._steps = steps
        if steps.accumulation_steps == 1:
            # Every micro-batch completes its gradients: zero_grad() is the optimizer's own,
            # without a call in between (a measurable share of a small model's step).
            self.zero_grad = optimizer.zero_grad  # type: ignore[method-assign]

    # The state lives in the wrapped optimizer; these keep schedulers and user code working.
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    def step(self, closure: Callable[[], float] | None = None) -> Any:
        return self._steps.optimizer_step(self.optimizer, closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._steps.sync_gradients:
            self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def __getstate__(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer}

    def __repr__(self) -> str:
        return f"PreparedOptimizer({self.optimizer!r})"


class PreparedScheduler:
    """The user's LR scheduler, stepping once per optimizer step, not per micro-batch."""

    def __init__(self, scheduler: Any, steps: TrainingStep) -> None:
        self.scheduler = scheduler
        self._steps = steps

    def step(self, *args: Any, **kwargs: Any) -> None:
        if self._steps.sync_gradients:
            self.scheduler.step(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.scheduler, name)


class PreparedLoader:
    """Iterates the user's loader: this rank's shard, batches on the run's device.

    The order of every epoch depends only on ``(seed, epoch)``: at the start of each pass the
    loader's shuffling and worker-seed generators are re-seeded and ``set_epoch`` is called on
    its samplers and collate function. That makes a resume exact: :meth:`state_dict` holds the
    epoch and the number of batches already consumed, and a resumed pass replays the data
    pipeline up to that position (loading but not training on those batches) before yielding;
    then ``replayed()`` puts the random generators back to their saved state.
    """

    def __init__(
        self,
        loader: DataLoader[Any],
        device: torch.device,
        steps: TrainingStep,
        *,
        seed: int,
        replayed: Callable[[], None],
        world_invariant: bool,
    ) -> None:
        self.loader = loader
        self.world_invariant = world_invariant
        """Whether the samples of a step depend only on the global batch, not on how many
        processes share it (stoker split the loader: rank r of W takes samples r, r+W, ...):
        then a resume on another number of processes with the same global batch is exact."""
        self.device = device
        self.epoch = 0
        self.position = 0
        self._skip = 0
        self._steps = steps
        self._replayed = replayed
        self._seed = seed
        self._move = device.type != "cpu"
        # Pinned host memory lets the copy overlap compute; only then is non_blocking safe.
        self._non_blocking = device.type == "cuda" and bool(loader.pin_memory)
        self.clock: DataClock | None = None
        """Where fetch time and samples are counted (set by the meters), or None."""

    def _start_epoch(self) -> None:
        loader, epoch = self.loader, self.epoch
        if isinstance(loader.sampler, RandomSampler) and loader.sampler.generator is None:
            loader.sampler.generator = torch.Generator()
        if loader.generator is None:  # worker seeds come from here (else from the global RNG)
            loader.generator = torch.Generator()
        seed = order_seed(self._seed, epoch)
        loader.generator.manual_seed(seed)
        if isinstance(loader.sampler, RandomSampler) and loader.sampler.generator is not None:
            loader.sampler.generator.manual_seed(seed)
        for part in (loader.batch_sampler, loader.sampler, loader.collate_fn):
            set_epoch = getattr(part, "set_epoch", None)
            if callable(set_epoch):
                set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:
        self._start_epoch()
        steps = self._steps
        iterator = iter(self.loader)
        skip, self._skip = self._skip, 0
        for _ in range(skip):  # replay to the resumed position, see the class docstring
            if next(iterator, _END) is _END:
                break
        self.position = skip
        self._replayed()
        clock, size = self.clock, self._batch_size() or 0
        while True:
            steps.start_micro_batch(True)  # before fetching: `position` batches are trained on
            started = time.perf_counter() if clock is not None else 0.0
            try:
                batch = next(iterator)
            except StopIteration:
                break
            if clock is not None:
                clock.wait += time.perf_counter() - started
                clock.samples += size
            self.position += 1
            yield _move(batch, self.device, self._non_blocking) if self._move else batch
        self.epoch += 1
        self.position = 0

    def _batch_size(self) -> int | None:
        size = self.loader.batch_size
        return size if size is not None else getattr(self.loader.batch_sampler, "batch_size", None)

    def _batches(self) -> int | None:
        try:
            return len(self.loader)
        except TypeError:  # an IterableDataset without __len__
            return None

    def state_dict(self) -> dict[str, Any]:
        # The position counts batches: the batch size and the batches per epoch say in what.
        return {
            "epoch": self.epoch,
            "position": self.position,
            "batch_size": self._batch_size(),
            "batches": self._batches(),
            "world_size": self._steps.dist.world_size,
        }

    def check_state_dict(self, state: Any) -> None:
        """Refuse a saved position this loader cannot replay exactly (before anything loads):
        another batch size or number of batches per epoch (a :class:`CheckpointMismatch`), or
        a position that is not within the epoch (the checkpoint is inconsistent)."""
        from stoker.checkpoint.errors import CheckpointError, CheckpointMismatch

        def count(key: str) -> int:
            value = state.get(key) if isinstance(state, dict) else None
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise CheckpointError(f"the loader's {key} is {value!r}, not a count")
            return value

        epoch, position = count("epoch"), count("position")
        where = f"{position} batches into epoch {epoch}"
        start_over = "or start over with resume='never' or a new run directory"
        was, now = state.get("batch_size"), self._batch_size()
        world = self._steps.dist.world_size
        saved_world = state.get("world_size", world)
        if saved_world != world:
            if not isinstance(saved_world, int) or isinstance(saved_world, bool):
                raise CheckpointError(f"the loader's world_size is {saved_world!r}, not a count")
            if not self.world_invariant:
                raise CheckpointMismatch(
                    f"the checkpoint was written by {saved_world} process(es) and this run has "
                    f"{world}: this loader's sampler splits the data by rank itself, so with "
                    "another number of processes samples would be repeated or skipped; run it "
                    f"on {saved_world} process(es) (stoker run --nproc {saved_world}), "
                    f"{start_over}"
                )
            if (
                not isinstance(was, int)
                or not isinstance(now, int)
                or was * saved_world != (now * world)
            ):
                fits = (was * saved_world / world) if isinstance(was, int) else None
                advice = (
                    f"resume with batch_size={fits:g} per process"
                    if fits is not None and fits == int(fits)
                    else f"resume on {saved_world} process(es)"
                )
                raise CheckpointMismatch(
                    f"the loader was saved {where} by {saved_world} process(es) x batch_size="
                    f"{was}; this run has {world} x batch_size={now}, another global batch, so "
                    f"replaying the position would land on other samples; {advice}, {start_over}"
                )
        elif "batch_size" in state and was != now:
            raise CheckpointMismatch(
                f"the loader was saved {where} with batch_size={was}; this one has "
                f"batch_size={now}, so replaying the position would land on other samples; "
                f"resume with batch_size={was}, {start_over}"
            )
        was, now = state.get("batches"), self._batches()
        if "batches" in state and was != now:
            raise CheckpointMismatch(
                f"the loader was saved {where} of {was} batches per epoch; this one has {now} "
                "(the data or its sharding changed), so replaying the position would land on "
                f"other samples; resume with the same data, {start_over}"
            )
        if now is not None and position > now:
            raise CheckpointError(
                f"the loader's position, {where}, is past the end of its {now} batches per "
                "epoch; the checkpoint is inconsistent"
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self._skip = int(state["position"])

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)
