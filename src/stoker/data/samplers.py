"""Batch samplers for ragged data: little padding, balanced ranks, exact resume.

Every sampler here is a ``torch.utils.data.Sampler[list[int]]`` to pass as ``batch_sampler=``
to a ``DataLoader``, and shares one contract (:class:`PlannedBatchSampler`):

- **Deterministic.** The whole epoch is planned up front from ``(seed, epoch)`` alone (NumPy
  PCG64 seeded with ``SeedSequence([seed, epoch])``); every rank computes the same plan.
- **Epochs.** Call :meth:`~PlannedBatchSampler.set_epoch` before each epoch, as with
  ``DistributedSampler``; if you don't, the next epoch starts by itself once one was finished.
- **Resumable mid-epoch.** ``state_dict()`` is ``{"epoch", "position", ...}`` where ``position``
  counts the steps handed out in this epoch; after ``load_state_dict`` the next iteration yields
  exactly the remaining batches. With ``num_workers > 0`` the DataLoader fetches indices ahead
  of your loop (up to ``num_workers * prefetch_factor`` batches), so save
  ``state_dict(consumed=steps_done_this_epoch)`` for an exact resume.
- **Distributed.** ``num_replicas``/``rank`` default to ``torch.distributed`` when it is
  initialised (else 1/0). Each step is planned as one *global* batch for all ranks and split
  into per-rank batches by a longest-processing-time partition on real tokens
  (:func:`balanced_partition`): every rank gets the same number of steps and nearly the same
  number of real tokens per step. Within an epoch no sample is dropped and none repeated; the
  epoch's last global batch borrows samples from the one before it if it has fewer samples than
  ranks. Only when that is impossible (one sample per rank per step and a remainder, e.g.
  ``batch_size=1``) are a few samples repeated to fill the last step; :attr:`num_repeated` says
  how many. ``LengthGroupedBatchSampler(drop_last=True)`` instead drops an incomplete last step.

Randomness versus padding: :class:`LengthGroupedBatchSampler` and
:class:`TokenBudgetBatchSampler` shuffle all indices, cut them into *mega-batches* of about
``mega_batch_factor`` global batches, sort each mega-batch by length, cut it into batches and
shuffle the order of the batches. ``mega_batch_factor=1`` only sorts inside a batch (random
batches, padding as high as without any grouping); larger factors put ever more similar lengths
together (less padding) but make a batch's composition more predictable from the lengths;
``None`` sorts the whole epoch (least padding, the same batch contents every epoch, only their
order changes). 50, as in the HF Trainer's ``LengthGroupedSampler``, is a good default.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from stoker.errors import StokerError

__all__ = [
    "LengthGroupedBatchSampler",
    "PlannedBatchSampler",
    "TokenBudgetBatchSampler",
    "balanced_partition",
]

_STATE_FORMAT = 1
Plan = list[list[list[int]]]  # steps x ranks x dataset indices


def balanced_partition(
    indices: Sequence[int], lengths: np.ndarray, parts: int, *, capacity: int | None = None
) -> list[list[int]]:
    """Split ``indices`` into ``parts`` groups of nearly equal total length (LPT greedy).

    Longest first, each index goes to the group with the fewest tokens so far among those with
    fewer than ``capacity`` members (default ``ceil(len(indices) / parts)``, so group sizes
    differ by at most one). Graham's LPT bound: the largest group exceeds the optimum by at most
    one item. For lengths ``[5, 4, 3, 3, 1]`` and 2 parts: ``[[0, 3], [1, 2, 4]]`` (8 and 8).
    """
    n = len(indices)
    cap = math.ceil(n / parts) if capacity is None else capacity
    if cap * parts < n:
        raise StokerError(
            f"balanced_partition cannot put {n} items into {parts} parts of capacity {cap}; "
            f"raise capacity to at least {math.ceil(n / parts)}."
        )
    order = sorted(indices, key=lambda i: -int(lengths[i]))  # stable: ties keep input order
    groups: list[list[int]] = [[] for _ in range(parts)]
    # (tokens so far, members, part): the lightest part pops first, then the smallest one, so
    # that empty samples still spread out and every part gets one if there are enough.
    heap = [(0, 0, p) for p in range(parts)]
    for i in order:
        tokens, members, p = heapq.heappop(heap)
        groups[p].append(int(i))
        if members + 1 < cap:
            heapq.heappush(heap, (tokens + int(lengths[i]), members + 1, p))
    return groups


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """The generator an epoch is planned from: PCG64 seeded with ``SeedSequence([seed, epoch])``."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch])))


def _resolve_replicas(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if num_replicas is None:
        num_replicas = torch.distributed.get_world_size() if initialised else 1
    if rank is None:
        rank = torch.distributed.get_rank() if initialised else 0
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise StokerError(
            f"sampler got num_replicas={num_replicas}, rank={rank}; need num_replicas >= 1 and "
            f"0 <= rank < num_replicas."
        )
    return num_replicas, rank


def _as_lengths(lengths: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.asarray(lengths)
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise StokerError(
            f"sampler lengths must be a non-empty 1-D sequence of ints (one per sample); got "
            f"shape {arr.shape}, dtype {arr.dtype}."
        )
    if arr.min() < 0:
        bad = int(arr.argmin())
        raise StokerError(f"sampler lengths[{bad}] = {int(arr[bad])} is negative.")
    return arr.astype(np.int64)


class PlannedBatchSampler(Sampler[list[int]]):
    """Base class: plans a whole epoch as ``steps x ranks`` batches and yields this rank's.

    Subclasses implement :meth:`_plan` (all ranks' batches for one epoch from a NumPy
    generator). Attributes: ``lengths`` (int64 array), ``seed``, ``epoch``, ``num_replicas``,
    ``rank``. Every rank gets ``len(self)`` batches per epoch.
    """

    def __init__(
        self,
        lengths: Sequence[int] | np.ndarray,
        *,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        self.lengths = _as_lengths(lengths)
        if seed < 0:
            raise StokerError(f"sampler seed={seed} must be >= 0.")
        self.seed = int(seed)
        self.num_replicas, self.rank = _resolve_replicas(num_replicas, rank)
        if len(self.lengths) < self.num_replicas:
            raise StokerError(
                f"{len(self.lengths)} samples cannot give each of {self.num_replicas} ranks a "
                f"batch; use fewer ranks or more data."
            )
        self.epoch = 0
        self._position = 0  # steps handed out in `epoch`
        self._resume = False  # next __iter__ continues at _position (set by load_state_dict)
        self._finished = False  # the last iteration yielded the epoch's last step
        self._cache: tuple[int, Plan, int] | None = None  # (epoch, plan, repeated)

    # -- planning --------------------------------------------------------------------------
    def _plan(self, rng: np.random.Generator, epoch: int) -> tuple[Plan, int]:
        """All ranks' batches for ``epoch`` and the number of repeated samples."""
        raise NotImplementedError

    def _planned(self, epoch: int) -> tuple[Plan, int]:
        if self._cache is None or self._cache[0] != epoch:
            plan, repeated = self._plan(epoch_rng(self.seed, epoch), epoch)
            self._cache = (epoch, plan, repeated)
        return self._cache[1], self._cache[2]

    def plan(self, epoch: int | None = None) -> Plan:
        """Every rank's batches of ``epoch`` (default: the current one), as ``plan[step][rank]``.

        For inspection and simulation (e.g. :func:`stoker.data.accounting.summarize_plan`):
        one sampler describes what all ranks will receive.
        """
        return self._planned(self.epoch if epoch is None else epoch)[0]

    @property
    def num_repeated(self) -> int:
        """Samples repeated in the last step of the epoch the next iteration runs (as ``len``).

        0 unless unavoidable (module docstring).
        """
        return self._planned(self._next_epoch())[1]

    def _next_epoch(self) -> int:
        return self.epoch + 1 if self._finished else self.epoch

    # -- iteration -------------------------------------------------------------------------
    def __len__(self) -> int:
        """Steps (this rank's batches) in the epoch the next iteration runs."""
        return len(self._planned(self._next_epoch())[0])

    def __iter__(self) -> Iterator[list[int]]:
        if self._finished:
            self.epoch += 1  # previous epoch complete and set_epoch not called: move on
            self._finished = False
            self._position = 0
        start = self._position if self._resume else 0
        self._resume = False
        plan = self._planned(self.epoch)[0]
        if start >= len(plan):  # resumed from a checkpoint taken at the end of an epoch
            self.epoch += 1
            plan, start = self._planned(self.epoch)[0], 0
        self._position = start
        for step in range(start, len(plan)):
            self._position = step + 1
            self._finished = step + 1 == len(plan)
            yield plan[step][self.rank]

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration plans (keeps a just-loaded position if equal)."""
        if epoch < 0:
            raise StokerError(f"set_epoch({epoch}): epoch must be >= 0.")
        if epoch != self.epoch or not self._resume:
            self._position = 0
            self._resume = False
        self.epoch = int(epoch)
        self._finished = False

    # -- checkpointing ---------------------------------------------------------------------
    def _fingerprint(self) -> dict[str, Any]:
        return {
            "kind": type(self).__name__,
            "seed": self.seed,
            "num_samples": len(self.lengths),
            "num_replicas": self.num_replicas,
        }

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """Plain ints and strings: ``epoch``, ``position`` and what the plan depends on.

        ``consumed``: steps your loop actually finished this epoch, when the DataLoader ran
        ahead of it (``num_workers > 0``); must not exceed the steps handed out.
        """
        position = self._position
        if consumed is not None:
            if not 0 <= consumed <= self._position:
                raise StokerError(
                    f"state_dict(consumed={consumed}) but {self._position} steps of epoch "
                    f"{self.epoch} were handed out; pass a count in [0, {self._position}]."
                )
            position = consumed
        return {
            "format": _STATE_FORMAT,
            "epoch": self.epoch,
            "position": position,
            **self._fingerprint(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` was taken (the next iteration yields the rest)."""
        missing = sorted({"format", "epoch", "position"} - set(state))
        if missing:
            raise StokerError(f"sampler state is missing keys {missing}; pass a state_dict().")
        mismatched = {
            k: (state.get(k), v) for k, v in self._fingerprint().items() if state.get(k) != v
        }
        if mismatched:
            detail = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in mismatched.items())
            raise StokerError(
                f"sampler state does not match this sampler ({detail}); resume with the same "
                f"data, seed and number of ranks, or start a fresh epoch with set_epoch()."
            )
        self.epoch = int(state["epoch"])
        self._position = int(state["position"])
        self._resume = True
        self._finished = False


def _fill_last_batch(batches: list[list[int]], lengths: np.ndarray, parts: int) -> int:
    """Make the last global batch hold at least ``parts`` samples; returns samples repeated.

    Borrows from the closest earlier batches that keep more than ``parts`` samples, taking their
    shortest (mega-batches are sorted longest first, so those are closest in length to the
    tail). Moving a sample out never breaks a token budget (fewer samples, no longer maximum),
    and a batch of ``parts`` samples is one per rank, which always fits. Repeats samples of the
    previous batches only when none can spare one (every batch holds one sample per rank).
    """
    last = batches[-1]
    for donor in reversed(batches[:-1]):
        while len(last) < parts and len(donor) > parts:
            shortest = min(range(len(donor)), key=lambda j: (int(lengths[donor[j]]), -j))
            last.append(donor.pop(shortest))
        if len(last) >= parts:
            return 0
    pool = [i for b in batches[:-1] for i in b]  # non-empty: there are >= parts samples
    repeated = 0
    while len(last) < parts:
        last.append(pool[-1 - repeated % len(pool)])
        repeated += 1
    return repeated


def _split_steps(global_batches: list[list[int]], lengths: np.ndarray, parts: int) -> Plan:
    return [balanced_partition(g, lengths, parts) for g in global_batches]


def _mega_batches(rng: np.random.Generator, lengths: np.ndarray, size: int) -> np.ndarray:
    """A permutation that is sorted by length (longest first) inside each run of ``size``."""
    perm = rng.permutation(len(lengths))
    out = [
        chunk[np.argsort(-lengths[chunk], kind="stable")]
        for chunk in np.array_split(perm, range(size, len(perm), size))
    ]
    return np.concatenate(out)


class LengthGroupedBatchSampler(PlannedBatchSampler):
    """Fixed-size batches of similar lengths (mega-batch bucketing), rank-balanced.

    Args:
        lengths: tokens per sample (after any truncation your collator does).
        batch_size: samples per rank per step.
        mega_batch_factor: global batches per sorted mega-batch; the randomness knob (module
            docstring). ``None`` sorts the whole epoch.
        drop_last: drop the last step if it has fewer than ``batch_size * num_replicas``
            samples (those samples are not seen this epoch). Default: keep it, smaller.
        seed, num_replicas, rank: see :class:`PlannedBatchSampler`.

    With ranks, a step's ``batch_size * num_replicas`` similar-length samples are split into
    ``batch_size``-sample rank batches of nearly equal real tokens.
    """

    def __init__(
        self,
        lengths: Sequence[int] | np.ndarray,
        batch_size: int,
        *,
        mega_batch_factor: int | None = 50,
        drop_last: bool = False,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise StokerError(f"batch_size={batch_size} must be >= 1.")
        if mega_batch_factor is not None and mega_batch_factor < 1:
            raise StokerError(
                f"mega_batch_factor={mega_batch_factor} must be >= 1 or None (sort the whole "
                f"epoch); 50 is the usual choice."
            )
        super().__init__(lengths, seed=seed, num_replicas=num_replicas, rank=rank)
        self.batch_size = batch_size
        self.mega_batch_factor = mega_batch_factor
        self.drop_last = drop_last
        if drop_last and len(self.lengths) < batch_size * self.num_replicas:
            raise StokerError(
                f"drop_last=True with {len(self.lengths)} samples < batch_size {batch_size} x "
                f"{self.num_replicas} ranks leaves no step; use drop_last=False."
            )

    def _fingerprint(self) -> dict[str, Any]:
        return {
            **super()._fingerprint(),
            "batch_size": self.batch_size,
            "mega_batch_factor": self.mega_batch_factor,
            "drop_last": self.drop_last,
        }

    def _plan(self, rng: np.random.Generator, epoch: int) -> tuple[Plan, int]:
        n, parts = len(self.lengths), self.num_replicas
        step = self.batch_size * parts
        mega = n if self.mega_batch_factor is None else self.mega_batch_factor * step
        order = _mega_batches(rng, self.lengths, mega).tolist()
        batches = [order[i : i + step] for i in range(0, n, step)]
        repeated = 0
        if len(batches[-1]) < step and self.drop_last:
            batches.pop()
        elif len(batches[-1]) < parts:
            repeated = _fill_last_batch(batches, self.lengths, parts)
        batches = [batches[i] for i in rng.permutation(len(batches))]
        return _split_steps(batches, self.lengths, parts), repeated


class TokenBudgetBatchSampler(PlannedBatchSampler):
    """Variable batch size: each rank's batch has ``len(batch) * longest <= max_tokens``.

    ``max_tokens`` counts padded positions per rank, i.e. what a collator padding to the
    longest sample computes on; it is the knob that fixes activation memory across batches of
    short and long samples. Samples are grouped by length as in
    :class:`LengthGroupedBatchSampler`; a mega-batch holds ``mega_batch_factor`` batches of the
    average length. Every sample must fit: ``length <= max_tokens``.
    """

    def __init__(
        self,
        lengths: Sequence[int] | np.ndarray,
        max_tokens: int,
        *,
        mega_batch_factor: int | None = 50,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        if max_tokens < 1:
            raise StokerError(f"max_tokens={max_tokens} must be >= 1.")
        if mega_batch_factor is not None and mega_batch_factor < 1:
            raise StokerError(
                f"mega_batch_factor={mega_batch_factor} must be >= 1 or None; 50 is usual."
            )
        super().__init__(lengths, seed=seed, num_replicas=num_replicas, rank=rank)
        if self.lengths.max() > max_tokens:
            bad = int(self.lengths.argmax())
            raise StokerError(
                f"sample {bad} has {int(self.lengths[bad])} tokens > max_tokens={max_tokens}; "
                f"raise max_tokens or cut long samples first (stoker.data.mlm.chunk_documents)."
            )
        self.max_tokens = max_tokens
        self.mega_batch_factor = mega_batch_factor

    def _fingerprint(self) -> dict[str, Any]:
        return {
            **super()._fingerprint(),
            "max_tokens": self.max_tokens,
            "mega_batch_factor": self.mega_batch_factor,
        }

    def _plan(self, rng: np.random.Generator, epoch: int) -> tuple[Plan, int]:
        lengths, parts = self.lengths, self.num_replicas
        cost = np.maximum(lengths, 1)  # an empty sample still occupies a row
        per_batch = max(1, self.max_tokens // max(1, int(cost.mean())))
        n = len(lengths)
        mega = n if self.mega_batch_factor is None else self.mega_batch_factor * per_batch * parts
        batches: list[list[int]] = [[]]
        longest = 0
        for i in _mega_batches(rng, lengths, mega).tolist():
            longest_with = max(longest, int(cost[i]))
            # Split into `parts` batches of at most ceil(k/parts) samples, each must fit.
            if math.ceil((len(batches[-1]) + 1) / parts) * longest_with > self.max_tokens:
                batches.append([])
                longest_with = int(cost[i])
            batches[-1].append(i)
            longest = longest_with
        repeated = _fill_last_batch(batches, lengths, parts) if len(batches[-1]) < parts else 0
        batches = [batches[i] for i in rng.permutation(len(batches))]
        return _split_steps(batches, lengths, parts), repeated
