"""Sequence-length warm-up for packed text: short rows first, full rows from a given step on.

Early in training a model learns mostly local statistics, which short rows teach as well as
long ones at a fraction of the attention cost (Li et al. 2022, "The Stability-Efficiency
Dilemma"; Composer's ``SeqLengthWarmup``). :class:`SequenceLengthWarmup` says which row length
step ``s`` uses; :class:`~stoker.data.packing.PackedBatchSampler` follows it
(``length_schedule=``) and keeps the **tokens per batch** constant (``rows * max_len``), so a
step at length 32 holds 4x the rows of a step at 128 and the learning-rate schedule still sees
the same amount of data per step.

Lengths are **bucketed** (powers of two, or multiples of ``bucket``), so a compiled model meets
at most ``len(schedule.buckets(max_len))`` shapes: for ``start_len=16, max_len=128`` and
``"pow2"``, the rows are 16, 32, 64, then 128 tokens long (4 shapes).

How the row length reaches the collator: the sampler yields :class:`RowBatch` (a ``list`` of
document indices with a ``row_len`` attribute); wrap the documents in :class:`RowDocuments` so
that the DataLoader hands that length on to the collator (its ``__getitems__`` returns the
documents as a :class:`RowBatch` too); :class:`~stoker.data.packing.PackingCollator` reads it.
Both survive DataLoader workers (a list subclass pickles with its attributes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from stoker.errors import StokerError

__all__ = ["RowBatch", "RowDocuments", "SequenceLengthWarmup"]


@dataclass(frozen=True, slots=True, kw_only=True)
class SequenceLengthWarmup:
    """Row length as a function of the optimizer step: a linear ramp, rounded down to buckets.

    For ``start_len=16, warmup_steps=100, bucket="pow2"`` and ``max_len=128``: the raw length
    ``16 + 112 * step / 100`` rounds down to 16 for steps 0-14, 32 for 15-42, 64 for 43-99,
    and is 128 from step 100 on.
    """

    warmup_steps: int
    """Optimizer steps until rows are ``max_len`` long (0: no warm-up)."""
    start_len: int = 32
    """Row length at step 0 (rounded down to a bucket)."""
    bucket: int | Literal["pow2"] = "pow2"
    """``"pow2"``: lengths are powers of two (then ``max_len``); an int ``m``: multiples of
    ``m`` (then ``max_len``). Bounds the number of shapes a compiled model sees."""

    def __post_init__(self) -> None:
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise StokerError(
                f"SequenceLengthWarmup.warmup_steps={self.warmup_steps!r} must be an int >= 0."
            )
        if not isinstance(self.start_len, int) or self.start_len < 1:
            raise StokerError(
                f"SequenceLengthWarmup.start_len={self.start_len!r} must be an int >= 1."
            )
        if self.bucket != "pow2" and (not isinstance(self.bucket, int) or self.bucket < 1):
            raise StokerError(
                f"SequenceLengthWarmup.bucket={self.bucket!r}; valid choices: 'pow2' or an "
                f"int >= 1 (e.g. 64: lengths are multiples of 64)."
            )

    @classmethod
    def from_fraction(
        cls, fraction: float, total_steps: int, **kwargs: Any
    ) -> SequenceLengthWarmup:
        """Full length after ``fraction`` of ``total_steps`` (e.g. 0.3 of 1500 = step 450)."""
        if not 0.0 <= fraction <= 1.0:
            raise StokerError(f"sequence-length warm-up fraction={fraction} must be in [0, 1].")
        return cls(warmup_steps=round(fraction * total_steps), **kwargs)

    def buckets(self, max_len: int) -> list[int]:
        """Every row length this schedule can use for rows of at most ``max_len``, ascending."""
        start = min(self.start_len, max_len)
        if self.bucket == "pow2":
            low = 2 ** int(math.log2(start))
            found = [low * 2**k for k in range(int(math.log2(max_len / low)) + 1)]
        else:
            step = int(self.bucket)
            low = max(step, start // step * step)
            found = list(range(low, max_len, step))
        return sorted({n for n in found if n < max_len} | {max_len})

    def row_len(self, step: int, max_len: int) -> int:
        """The row length of optimizer step ``step`` (0-based)."""
        if step >= self.warmup_steps:
            return max_len
        start = min(self.start_len, max_len)
        raw = start + (max_len - start) * step / self.warmup_steps
        buckets = self.buckets(max_len)
        fitting = [n for n in buckets if n <= raw]
        return fitting[-1] if fitting else buckets[0]


class RowBatch(list[Any]):
    """A ``list`` (of indices, or of documents) with the ``row_len`` its rows are packed to."""

    row_len: int | None = None

    def __init__(self, items: Any = (), row_len: int | None = None) -> None:
        super().__init__(items)
        self.row_len = row_len


class RowDocuments:
    """Map-style dataset over ``docs`` that passes a :class:`RowBatch`'s ``row_len`` on.

    ``DataLoader(RowDocuments(docs), batch_sampler=sampler, collate_fn=collator)``: the
    collator receives a :class:`RowBatch` of documents with the sampler's ``row_len``.
    """

    def __init__(self, docs: Sequence[Any]) -> None:
        self.docs = docs

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, index: int) -> Any:
        return self.docs[index]

    def __getitems__(self, indices: Sequence[int]) -> RowBatch:
        return RowBatch((self.docs[i] for i in indices), getattr(indices, "row_len", None))
