"""Sequence packing: documents concatenated into fixed-length rows, attention kept per document.

A packed batch has ``rows`` rows of ``max_len`` tokens. Documents are placed whole into rows by
best-fit decreasing (:func:`pack_rows`); a document longer than a row is either **split** into
``max_len`` pieces (full rows of their own; the remainder is packed like a short document) or
**truncated** to its first ``max_len`` tokens (:attr:`PackingConfig.long_documents`). Each
piece is its own attention segment with positions restarting at 0, so a model that attends
within ``document_ids`` sees exactly what it would see for the piece alone.

Worked example (torchtitan style), ``max_len=6`` and documents of lengths ``[3, 2, 6]``: the
6-token document fills row 0, the others share row 1::

    document_ids  [[0, 0, 0, 0, 0, 0], [0, 0, 0, 1, 1, -1]]
    position_ids  [[0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 1,  0]]
    valid         [[T, T, T, T, T, T], [T, T, T, T, T,  F]]
    cu_seqlens    [0, 6, 9, 11, 12]   (offsets into the flattened B*T tokens; the pad is a
                                       segment of its own so the segments tile all B*T)

Two halves work together: :class:`PackedBatchSampler` chooses which documents go into each
batch (best-fit decreasing inside a shuffled window, so rows come out ~full and every batch
needs at most ``rows`` rows), and :class:`PackingCollator` lays them out. The collator re-runs
the same deterministic :func:`pack_rows` on the documents it receives; because best fit only
looks at the rows' current contents, a batch made of some of a window's rows packs into exactly
those rows again. The collator also works alone, behind any sampler, with a variable number of
rows (``rows=None``).

Attention that does not cross documents: :func:`block_diagonal_mask` for
``F.scaled_dot_product_attention`` (any device; what stoker's encoder does), or
:func:`packed_attention` with ``backend="flex"`` (compiled ``flex_attention``, which skips
fully masked blocks). Measured with torch 2.13 on the 2-core CPU: FlexAttention runs
(compiled and eager, results within 1e-6 of the dense mask) but has **no backward on CPU**, and
its forward was not faster than the dense mask at the tiny encoder's shapes (see
``benchmarks/ragged.py --flex``); so the dense mask is the default, and flex is for GPUs or
inference.
"""

from __future__ import annotations

import bisect
import functools
import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from stoker.data.samplers import Plan, PlannedBatchSampler, epoch_rng
from stoker.data.seqlen import RowBatch, SequenceLengthWarmup
from stoker.data.tokenizer import PAD_ID
from stoker.errors import StokerError

__all__ = [
    "PackedBatchSampler",
    "PackingCollator",
    "PackingConfig",
    "block_diagonal_mask",
    "pack_rows",
    "packed_attention",
]

_LONG_DOCUMENTS = ("split", "truncate")
Segment = tuple[int, int, int]  # (document index in the input, start, stop) token range


@dataclass(frozen=True, slots=True, kw_only=True)
class PackingConfig:
    """Row layout shared by :class:`PackingCollator` and :class:`PackedBatchSampler`."""

    max_len: int
    """Tokens per row (T). Position ids stay below it."""
    rows: int | None = None
    """Rows per batch (per rank). The collator always returns exactly this many (static shapes
    for ``torch.compile``); the sampler fills them. ``None``: as many as the documents need
    (collator only)."""
    long_documents: Literal["split", "truncate"] = "split"
    """A document longer than ``max_len``: ``"split"`` keeps every token (pieces of
    ``max_len`` in rows of their own, the rest packed as a short document, each piece attending
    only to itself); ``"truncate"`` keeps its first ``max_len`` tokens."""

    def __post_init__(self) -> None:
        if not isinstance(self.max_len, int) or self.max_len < 1:
            raise StokerError(f"PackingConfig.max_len={self.max_len!r} must be an int >= 1.")
        if self.rows is not None and (not isinstance(self.rows, int) or self.rows < 1):
            raise StokerError(f"PackingConfig.rows={self.rows!r} must be an int >= 1 or None.")
        if self.long_documents not in _LONG_DOCUMENTS:
            raise StokerError(
                f"PackingConfig.long_documents={self.long_documents!r}; valid choices: "
                f"{', '.join(_LONG_DOCUMENTS)}."
            )

    def at_row_len(self, row_len: int) -> PackingConfig:
        """This layout with rows of ``row_len`` tokens and the same tokens per batch
        (``rows * max_len // row_len`` rows; for sequence-length warm-up, see
        :mod:`stoker.data.seqlen`)."""
        if row_len == self.max_len:
            return self
        if not isinstance(row_len, int) or not 1 <= row_len <= self.max_len:
            raise StokerError(
                f"row_len={row_len!r} must be an int in [1, PackingConfig.max_len={self.max_len}]."
            )
        rows = None if self.rows is None else max(1, self.rows * self.max_len // row_len)
        return PackingConfig(max_len=row_len, rows=rows, long_documents=self.long_documents)

    def rows_alone(self, length: int) -> int:
        """Rows one document of ``length`` tokens occupies when packed by itself."""
        if self.long_documents == "truncate":
            return 1 if length else 0
        return -(-length // self.max_len)


def pack_rows(lengths: Sequence[int], config: PackingConfig) -> list[list[Segment]]:
    """Place documents of ``lengths`` into rows of ``config.max_len``; ``rows[r]`` = segments.

    A document's pieces (see :class:`PackingConfig`) are placed in this order: first the full
    ``max_len`` pieces of split documents (a row each), then the remainders of split documents
    (a new row each, so a split document and the rows it touches never exceed
    ``rows_alone(length)``), then the unsplit documents, longest first, each into the open row
    with the least free space that still fits it (best fit decreasing), else into a new row.
    Ties keep input order. Deterministic, and a piece's place only depends on the rows' current
    contents: packing the documents of some of the rows again (in the same relative order)
    reproduces those rows. For ``max_len=6``, ``[3, 2, 6]`` gives
    ``[[(2, 0, 6)], [(0, 0, 3), (1, 0, 2)]]``.

    Why remainders get rows of their own early: taken with the others, a split document's
    short remainder would come late, find every row too full, and open a nearly empty row.
    """
    t = config.max_len
    # (kind, -length, doc, start, stop): kind 0 = full piece, 1 = remainder, 2 = unsplit.
    pieces: list[tuple[int, int, int, int, int]] = []
    for doc, length in enumerate(lengths):
        if config.long_documents == "truncate":
            if length:
                n = min(int(length), t)
                pieces.append((2, -n, doc, 0, n))
            continue
        full, rest = divmod(int(length), t)
        pieces.extend((0, -t, doc, j * t, (j + 1) * t) for j in range(full))
        if rest:
            pieces.append((1 if full else 2, -rest, doc, full * t, full * t + rest))
    pieces.sort(key=lambda p: (p[0], p[1]))  # stable: ties keep input order

    rows: list[list[Segment]] = []
    # Open rows with free space, sorted by (free tokens, row index): bisect finds the best fit.
    open_rows: list[tuple[int, int]] = []
    for kind, neg_n, doc, start, stop in pieces:
        n = -neg_n
        j = bisect.bisect_left(open_rows, (n, -1))
        if kind < 2 or j == len(open_rows):
            free, row = t - n, len(rows)
            rows.append([(doc, start, stop)])
        else:
            free, row = open_rows.pop(j)
            free -= n
            rows[row].append((doc, start, stop))
        if free > 0:
            bisect.insort(open_rows, (free, row))
    return rows


class PackingCollator:
    """Layout collator: ``list[np.ndarray]`` of token ids -> packed tensors.

    Returns ``input_ids`` [B, T] long (``pad_id`` on padding), ``valid`` [B, T] bool,
    ``document_ids`` [B, T] long (per-row segment index, -1 on padding), ``position_ids``
    [B, T] long (restart at 0 per segment) and ``cu_seqlens`` [S + 1] int32 (segment offsets in
    the flattened ``B*T`` tokens, trailing padding of a row being one segment); see the module
    docstring's worked example. ``B = config.rows`` when set (empty rows are all padding), else
    the number of rows needed. Pass ``document_ids`` and ``position_ids`` to the model
    (``Encoder(input_ids, document_ids=..., position_ids=...)``), not an attention mask.

    Documents that come as a :class:`~stoker.data.seqlen.RowBatch` with a ``row_len`` (from a
    sampler with a sequence-length schedule, through
    :class:`~stoker.data.seqlen.RowDocuments`) are packed into rows of that length, with the
    same tokens per batch (:meth:`PackingConfig.at_row_len`).
    """

    def __init__(self, config: PackingConfig, *, pad_id: int = PAD_ID) -> None:
        self.config = config
        self.pad_id = pad_id

    def __call__(self, docs: Sequence[np.ndarray]) -> dict[str, Tensor]:
        row_len = getattr(docs, "row_len", None)
        cfg = self.config if row_len is None else self.config.at_row_len(row_len)
        t = cfg.max_len
        layout = pack_rows([len(d) for d in docs], cfg)
        b = cfg.rows if cfg.rows is not None else max(1, len(layout))
        if len(layout) > b:
            raise StokerError(
                f"{len(docs)} documents ({sum(len(d) for d in docs)} tokens) need "
                f"{len(layout)} rows of {t} but PackingConfig.rows={b}; draw batches with "
                f"PackedBatchSampler(config=the same PackingConfig) or set rows=None."
            )
        ids = np.full((b, t), self.pad_id, dtype=np.int64)
        document_ids = np.full((b, t), -1, dtype=np.int64)
        position_ids = np.zeros((b, t), dtype=np.int64)
        offsets = [0]
        for r in range(b):
            col = 0
            for seg, (doc, start, stop) in enumerate(layout[r] if r < len(layout) else ()):
                n = stop - start
                ids[r, col : col + n] = docs[doc][start:stop]
                document_ids[r, col : col + n] = seg
                position_ids[r, col : col + n] = np.arange(n)
                col += n
                offsets.append(r * t + col)
            if col < t:
                offsets.append((r + 1) * t)
        document_ids_t = torch.from_numpy(document_ids)
        return {
            "input_ids": torch.from_numpy(ids),
            "valid": document_ids_t >= 0,
            "document_ids": document_ids_t,
            "position_ids": torch.from_numpy(position_ids),
            "cu_seqlens": torch.tensor(offsets, dtype=torch.int32),
        }


class PackedBatchSampler(PlannedBatchSampler):
    """Batches of documents that pack into ``config.rows`` rows of ``config.max_len`` with
    almost no padding; use with ``PackingCollator(config)`` (the same config).

    Each epoch: shuffle the documents, take them ``window`` at a time (plus what the previous
    window left unpacked), pack the window with :func:`pack_rows`, and group its rows into
    batches of ``rows`` rows (a split document's rows stay together). ``window`` is the
    randomness knob: a batch only mixes documents from one window, and a larger window fills
    rows better. With ``num_replicas`` ranks, batches holding about the same number of tokens
    form a step, and the epoch's last step(s) are rebalanced document by document over the
    ranks (:class:`PlannedBatchSampler` has the contract).

    Args:
        lengths: tokens per document, before packing (the collator splits or truncates).
        config: the layout; ``config.rows`` is required here.
        window: documents packed together (default 2048).
        seed, num_replicas, rank: see :class:`PlannedBatchSampler`.
        length_schedule: sequence-length warm-up (:mod:`stoker.data.seqlen`): step ``s`` of
            training packs rows of ``length_schedule.row_len(s, config.max_len)`` tokens, with
            the same tokens per batch. Batches are then shuffled only among batches of the same
            length, each epoch still hands out every document exactly once, and steps count
            from the first epoch's first batch (an epoch's plan depends on the steps before
            it). Batches are :class:`~stoker.data.seqlen.RowBatch` carrying their ``row_len``:
            wrap the dataset in :class:`~stoker.data.seqlen.RowDocuments`. One process only.
    """

    def __init__(
        self,
        lengths: Sequence[int] | np.ndarray,
        config: PackingConfig,
        *,
        window: int = 2048,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        length_schedule: SequenceLengthWarmup | None = None,
    ) -> None:
        if config.rows is None:
            raise StokerError(
                "PackedBatchSampler needs PackingConfig(rows=...): the rows per batch it fills."
            )
        if window < 1:
            raise StokerError(f"PackedBatchSampler window={window} must be >= 1 documents.")
        super().__init__(lengths, seed=seed, num_replicas=num_replicas, rank=rank)
        self.config = config
        self.rows = config.rows
        self.window = window
        self.length_schedule = length_schedule
        self._starts = [0]  # optimizer steps before epoch e (length schedule only)
        if length_schedule is not None and self.num_replicas > 1:
            raise StokerError(
                f"PackedBatchSampler(length_schedule=...) runs on one process; got "
                f"num_replicas={self.num_replicas}. Drop the length schedule under data "
                f"parallelism."
            )
        lengths = [config.max_len]
        if length_schedule is not None:
            lengths = length_schedule.buckets(config.max_len)
        for row_len in lengths:
            cfg = config.at_row_len(row_len)
            need = [cfg.rows_alone(int(n)) for n in self.lengths]
            worst = int(np.argmax(need))
            if cfg.rows is not None and need[worst] > cfg.rows:
                raise StokerError(
                    f"document {worst} has {int(self.lengths[worst])} tokens = {need[worst]} "
                    f"rows of {cfg.max_len} > {cfg.rows} rows per batch; raise rows, use "
                    f"long_documents='truncate', or cut documents first "
                    f"(stoker.data.mlm.chunk_documents)."
                )

    def _fingerprint(self) -> dict[str, Any]:
        cfg = self.config
        return {
            **super()._fingerprint(),
            "max_len": cfg.max_len,
            "rows": cfg.rows,
            "long_documents": cfg.long_documents,
            "window": self.window,
            "length_schedule": None
            if self.length_schedule is None
            else [
                self.length_schedule.warmup_steps,
                self.length_schedule.start_len,
                self.length_schedule.bucket,
            ],
        }

    def _kept(self, docs: Sequence[int]) -> int:
        """Tokens of ``docs`` that the collator keeps (all, or ``max_len`` each if truncating)."""
        lengths = self.lengths[list(docs)]
        if self.config.long_documents == "truncate":
            lengths = np.minimum(lengths, self.config.max_len)
        return int(lengths.sum())

    def _rows_needed(self, docs: Sequence[int]) -> int:
        return len(pack_rows(self.lengths[list(docs)].tolist(), self.config))

    def _window_batches(
        self, items: list[int], last: bool, config: PackingConfig | None = None
    ) -> tuple[list[tuple[int, list[int]]], list[int]]:
        """Pack ``items``; group the rows into ``(rows used, documents)`` batches.

        Unless this is the epoch's ``last`` window, rows with more than 1/64 free among the
        last ``2 * rows`` that best fit opened (they hold the smallest leftovers; with the
        other rows of their split documents) and a last batch that is not full are not
        batched: their documents are returned, to be packed again with the next window.
        """
        config = self.config if config is None else config
        max_rows = int(config.rows or 1)
        lengths = self.lengths[items].tolist()
        layout = pack_rows(lengths, config)
        # A split document's rows form one unit with the row holding its remainder.
        unit_of_row = list(range(len(layout)))
        first_row: dict[int, int] = {}
        for r, row in enumerate(layout):
            for doc, _, _ in row:
                if doc in first_row:
                    unit_of_row[r] = unit_of_row[first_row[doc]]
                else:
                    first_row[doc] = r
        units: dict[int, list[int]] = {}  # first row -> rows, in row order
        for r, u in enumerate(unit_of_row):
            units.setdefault(u, []).append(r)

        def docs_of(rows: list[int]) -> list[int]:
            return [doc for r in rows for doc, start, _ in layout[r] if start == 0]

        # Worth repacking: rows with more than 1/64 free among the last ones best fit opened
        # (they hold the smallest leftovers). Bounded, so a corpus that cannot fill rows does
        # not pile up into the last window.
        slack = config.max_len // 64
        tail_rows = len(layout) - 2 * max_rows
        carry: list[int] = []
        batches: list[tuple[int, list[int]]] = []  # (rows used, local document indices)
        open_batches: list[int] = []  # indices of batches with a free row, in order
        for rows in units.values():  # first fit by rows, in row order
            least = min(sum(stop - start for _, start, stop in layout[r]) for r in rows)
            if not last and rows[0] >= tail_rows and config.max_len - least > slack:
                carry.extend(docs_of(rows))
                continue
            for k in open_batches:
                if batches[k][0] + len(rows) <= max_rows:
                    break
            else:
                batches.append((0, []))
                k = len(batches) - 1
                open_batches.append(k)
            used = batches[k][0] + len(rows)
            batches[k] = (used, batches[k][1] + docs_of(rows))
            if used == max_rows:
                open_batches.remove(k)
        if not last and batches and batches[-1][0] < max_rows:
            carry.extend(batches.pop()[1])
        empty = [d for d, n in enumerate(lengths) if n == 0]
        if empty:  # no rows, but they must still be handed out once
            if not batches:
                batches.append((0, []))
            batches[-1][1].extend(empty)
        # Documents in window order: the collator then repacks them into the same rows.
        return [(used, [items[d] for d in sorted(docs)]) for used, docs in batches], [
            items[d] for d in sorted(carry)
        ]

    def _epoch_start(self, epoch: int) -> int:
        """Optimizer steps before ``epoch`` (exact while the warm-up lasts: later, any count
        past it gives the same full-length plan)."""
        schedule = self.length_schedule
        assert schedule is not None  # only called with a length schedule
        while len(self._starts) <= epoch:
            e, start = len(self._starts) - 1, self._starts[-1]
            if start < schedule.warmup_steps:
                start += len(self._scheduled_plan(epoch_rng(self.seed, e), start))
            self._starts.append(start)
        return self._starts[epoch]

    def _scheduled_plan(self, rng: np.random.Generator, first_step: int) -> Plan:
        """One process's epoch under the length schedule, its steps counted from
        ``first_step``: windows are packed at the current step's length; when the length
        changes, the window's documents not yet batched are packed again at the new length.
        Batches are shuffled within each run of equal length, so lengths never go down."""
        schedule = self.length_schedule
        assert schedule is not None
        n, max_len = len(self.lengths), self.config.max_len
        order = rng.permutation(n).tolist()
        runs: list[tuple[int, list[list[int]]]] = []  # (row length, batches)
        carry: list[int] = []
        pos, step = 0, first_step
        while pos < n or carry:
            row_len = schedule.row_len(step, max_len)
            items = carry + order[pos : pos + self.window]
            pos += self.window
            batches, carry = self._window_batches(items, pos >= n, self.config.at_row_len(row_len))
            if not runs or runs[-1][0] != row_len:
                runs.append((row_len, []))
            for k, (_, docs) in enumerate(batches):
                if schedule.row_len(step, max_len) != row_len:  # pack the rest at the new one
                    carry = [d for _, rest in batches[k:] for d in rest] + carry
                    break
                runs[-1][1].append(docs)
                step += 1
        plan: Plan = []
        for row_len, run in runs:
            for i in rng.permutation(len(run)):
                plan.append([RowBatch(run[i], row_len)])
        return plan

    def _plan(self, rng: np.random.Generator, epoch: int) -> tuple[Plan, int]:
        if self.length_schedule is not None:
            return self._scheduled_plan(rng, self._epoch_start(epoch)), 0
        n, parts = len(self.lengths), self.num_replicas
        order = rng.permutation(n).tolist()
        full: list[list[int]] = []
        partial: list[list[int]] = []  # rows left empty, or the last window's least filled
        carry: list[int] = []
        for w in range(0, n, self.window):
            last = w + self.window >= n
            batches, carry = self._window_batches(carry + order[w : w + self.window], last)
            if last and parts > 1:
                # Nothing is carried out of the last window, so its worst-filled batches would
                # unbalance the steps they land in: up to `parts` of them are rebalanced.
                tokens = [self._kept(docs) for _, docs in batches]
                capacity = self.rows * self.config.max_len
                worst = sorted(range(len(batches)), key=lambda k: tokens[k])[:parts]
                low = {k for k in worst if tokens[k] < capacity - capacity // 64}
            else:
                low = set()
            for k, (used, docs) in enumerate(batches):
                (partial if used < self.rows or k in low else full).append(docs)
        shuffled = [full[i] for i in rng.permutation(len(full))]
        if parts == 1:
            return [[b] for b in shuffled + partial], 0
        # A step joins `parts` batches of about the same number of tokens (sorted; ties in
        # random order), then the steps are shuffled.
        shuffled.sort(key=self._kept)
        head = (len(full) // parts) * parts
        steps = [shuffled[i : i + parts] for i in range(0, head, parts)]
        steps = [steps[i] for i in rng.permutation(len(steps))]
        # Rebalance over the ranks what would make uneven steps: the partial batches and the
        # full ones left over after the last complete step.
        rest = shuffled[head:] + partial
        tail_steps = -(-len(rest) // parts)
        tail, repeated = self._rebalance([d for b in rest for d in b], tail_steps, steps)
        return steps + tail, repeated

    def _rebalance(self, docs: list[int], num_steps: int, earlier: Plan) -> tuple[Plan, int]:
        """Spread ``docs`` over ``num_steps`` steps of ``num_replicas`` batches that each pack
        into ``rows`` rows, balancing tokens (LPT); borrow from ``earlier`` or repeat if fewer
        documents than batches."""
        parts = self.num_replicas
        capacity = self.rows * self.config.max_len
        while True:
            slots: list[list[int]] = [[] for _ in range(num_steps * parts)]
            lightest = [(0, k) for k in range(len(slots))]  # heap of (tokens, slot)
            ok = True
            for d in sorted(docs, key=lambda i: -int(self.lengths[i])):
                need = self._kept([d])
                tried = []
                while lightest:
                    tokens, k = heapq.heappop(lightest)
                    # A slot fits d if its tokens allow it and its rows really do.
                    if tokens + need <= capacity and self._rows_needed([*slots[k], d]) <= self.rows:
                        slots[k].append(d)
                        heapq.heappush(lightest, (tokens + need, k))
                        break
                    tried.append((tokens, k))
                else:
                    ok = False
                for item in tried:
                    heapq.heappush(lightest, item)
                if not ok:
                    break
            if ok:
                break
            num_steps += 1
        repeated = 0
        for s in (s for s in range(len(slots)) if not slots[s]):
            donor = self._donor(slots, earlier)
            if donor is None:  # unavoidable: fewer documents than ranks x steps
                slots[s] = [docs[repeated % len(docs)]]
                repeated += 1
            else:
                slots[s] = [donor]
        return [slots[i : i + parts] for i in range(0, len(slots), parts)], repeated

    def _donor(self, slots: list[list[int]], earlier: Plan) -> int | None:
        """Take a short document from a batch that keeps at least one and still fits."""
        candidates = [*slots, *(b for step in reversed(earlier) for b in step)]
        for batch in candidates:
            if len(batch) < 2:
                continue
            for d in sorted(batch, key=lambda i: int(self.lengths[i])):
                rest = [i for i in batch if i != d]
                if self._rows_needed(rest) <= self.rows:
                    batch.remove(d)
                    return d
        return None


def block_diagonal_mask(document_ids: Tensor) -> Tensor:
    """[B, T] segment ids (padding -1) -> [B, 1, T, T] bool, True where query may see key.

    A token sees the tokens of its own segment; padding sees only padding, so no query row is
    all False (SDPA would return NaN there) and no real token ever sees padding. For ids
    ``[0, 0, 1, -1]``: row 0 is ``[T, T, F, F]``, row 2 ``[F, F, T, F]``, row 3 ``[F, F, F, T]``.
    """
    if document_ids.dim() != 2:
        raise StokerError(
            f"block_diagonal_mask wants document_ids [B, T]; got {tuple(document_ids.shape)}."
        )
    return (document_ids[:, :, None] == document_ids[:, None, :]).unsqueeze(1)


@functools.cache
def _compiled_flex() -> Callable[..., Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def packed_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    document_ids: Tensor,
    *,
    backend: Literal["sdpa", "flex"] = "sdpa",
) -> Tensor:
    """Attention over packed rows that stays inside each document.

    ``q``, ``k``, ``v``: [B, H, T, D]; ``document_ids``: [B, T] (padding -1). Returns
    [B, H, T, D]. ``"sdpa"`` materialises :func:`block_diagonal_mask` ([B, 1, T, T] bool) and
    calls ``F.scaled_dot_product_attention``; ``"flex"`` builds a FlexAttention block mask and
    runs the compiled kernel, which skips blocks that are fully masked (first call compiles,
    per shape; torch 2.13 has no FlexAttention backward on CPU). Both give the same result up
    to float rounding.
    """
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=block_diagonal_mask(document_ids))
    if backend != "flex":
        raise StokerError(f"packed_attention backend={backend!r}; valid choices: sdpa, flex.")
    from torch.nn.attention.flex_attention import create_block_mask

    def same_document(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return document_ids[b, q_idx] == document_ids[b, kv_idx]

    bsz, _, t, _ = q.shape
    block_mask = create_block_mask(same_document, bsz, None, t, t, device=q.device)
    return _compiled_flex()(q, k, v, block_mask=block_mask)
