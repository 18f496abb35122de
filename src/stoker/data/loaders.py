"""``mlm_loader``: the built-in MLM job's DataLoader, shared by training, compression and the
experiments so that all of them see batches of the same layout."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch.utils.data import DataLoader

from stoker.data.mlm import MLMCollator, chunk_documents, pad_batch
from stoker.data.packing import PackedBatchSampler, PackingCollator, PackingConfig
from stoker.data.seqlen import RowDocuments, SequenceLengthWarmup
from stoker.errors import StokerError

__all__ = ["MODEL_INPUTS", "mlm_loader", "model_inputs"]

MODEL_INPUTS = ("input_ids", "attention_mask", "document_ids", "position_ids", "predict_positions")


def mlm_loader(
    docs: Sequence[np.ndarray],
    *,
    vocab_size: int,
    max_len: int,
    batch_size: int,
    layout: str = "pack",
    shuffle: bool = True,
    seed: int = 0,
    rank: int = 0,
    length_schedule: SequenceLengthWarmup | None = None,
    num_workers: int = 0,
) -> DataLoader:
    """Rows of at most ``max_len`` tokens, packed into full rows or padded per batch, masked.

    ``pack``: whole documents share a row, each attending only to itself (~no padding).
    ``pad``: one row per chunk, padded to the longest row of its batch. The sampler's seed is
    the same on every rank (one plan, split over ranks); the masking seed differs per rank so
    ranks don't mask the same positions. ``length_schedule`` (``pack`` only): sequence-length
    warm-up, short rows first (:mod:`stoker.data.seqlen`). ``num_workers``: DataLoader worker
    processes.
    """
    rows: Any = chunk_documents(docs, max_len)  # a list is a map-style dataset
    mask_seed = seed * 1000 + rank
    if layout == "pack":
        packing = PackingConfig(max_len=max_len, rows=batch_size)
        sampler = PackedBatchSampler(
            [len(r) for r in rows], packing, seed=seed, length_schedule=length_schedule
        )
        collate = MLMCollator(PackingCollator(packing), vocab_size=vocab_size, seed=mask_seed)
        if length_schedule is not None:  # the row length travels with each batch's documents
            rows = RowDocuments(rows)
        return DataLoader(rows, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers)
    if length_schedule is not None:
        raise StokerError("mlm_loader(length_schedule=...) needs layout='pack'.")
    if layout != "pad":
        raise StokerError(f"Unknown layout {layout!r}; choose 'pack' or 'pad'.")
    collate = MLMCollator(
        functools.partial(pad_batch, max_len=max_len), vocab_size=vocab_size, seed=mask_seed
    )
    return DataLoader(
        rows, batch_size=batch_size, shuffle=shuffle, collate_fn=collate, num_workers=num_workers
    )


def model_inputs(batch: dict) -> dict:
    """The entries of an MLM batch that :class:`~stoker.models.Encoder` takes as arguments."""
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}
