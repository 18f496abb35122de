"""Fixed-shape BERT masking, the layout collator, chunking, loss and the unigram baseline."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from stoker.data.mlm import (
    IGNORE_INDEX,
    MLMCollator,
    chunk_documents,
    mask_tokens,
    mlm_accuracy,
    mlm_loss,
    pad_batch,
    unigram_baseline,
)
from stoker.data.tokenizer import MASK_ID, PAD_ID
from stoker.errors import StokerError

V = 1000


def _batch(b: int = 64, t: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    lengths[0] = t  # one full row
    lengths[1] = 3  # one row with fewer valid tokens than M
    valid = torch.arange(t)[None, :] < lengths[:, None]
    ids = torch.randint(2, V, (b, t), generator=g).masked_fill(~valid, PAD_ID)
    return ids, valid


def _mask(ids, valid, seed=0, rate=0.15):
    g = torch.Generator().manual_seed(seed)
    return mask_tokens(ids, valid, vocab_size=V, rate=rate, generator=g)


def test_shapes_positions_and_labels():
    ids, valid = _batch()
    masked, pos, labels = _mask(ids, valid)
    b, t = ids.shape
    m = math.ceil(0.15 * t)
    assert masked.shape == (b, t) and pos.shape == (b, m) and labels.shape == (b, m)
    assert pos.dtype == labels.dtype == torch.long
    counted = labels != IGNORE_INDEX
    # counted slots sit on valid tokens and carry the original id there
    assert valid.gather(1, pos)[counted].all()
    assert torch.equal(labels[counted], ids.gather(1, pos)[counted])
    # number of counted slots = min(M, valid tokens in row)
    assert torch.equal(counted.sum(1), valid.sum(1).clamp(max=m))
    # positions are distinct and sorted per row
    assert (pos[:, 1:] > pos[:, :-1]).all()
    # nothing outside the counted positions changes
    changed = masked != ids
    touched = torch.zeros_like(valid).scatter(1, pos, counted)
    assert not (changed & ~touched).any()
    assert not ((masked == MASK_ID) & ~valid).any()
    # a row with 3 valid tokens predicts all 3 of them
    assert counted[1].sum() == 3 and set(pos[1][counted[1]].tolist()) == {0, 1, 2}


def test_80_10_10_proportions():
    ids, valid = _batch(b=512, t=128)
    masked, pos, labels = _mask(ids, valid)
    counted = labels != IGNORE_INDEX
    new = masked.gather(1, pos)[counted]
    orig = labels[counted]
    n = orig.numel()
    frac_mask = (new == MASK_ID).float().mean().item()
    frac_same = (new == orig).float().mean().item()
    frac_random = 1 - frac_mask - frac_same
    assert n > 5000
    assert abs(frac_mask - 0.8) < 0.02
    assert abs(frac_same - 0.1) < 0.015  # (a random draw equal to the original is ~0.01%)
    assert abs(frac_random - 0.1) < 0.015
    assert (new[(new != MASK_ID)] >= 2).all()  # random ids never special tokens


def test_positions_are_uniform_over_valid_tokens():
    ids = torch.randint(2, V, (4000, 40))
    valid = torch.ones_like(ids, dtype=torch.bool)
    _, pos, _ = _mask(ids, valid)
    hist = torch.bincount(pos.flatten(), minlength=40).float()
    assert (hist / hist.mean() - 1).abs().max() < 0.1


def test_deterministic_for_a_seed():
    ids, valid = _batch()
    a, b = _mask(ids, valid, seed=3), _mask(ids, valid, seed=3)
    c = _mask(ids, valid, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[1], c[1])


def test_bad_shapes_raise():
    with pytest.raises(StokerError, match="same shape"):
        mask_tokens(
            torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 4, dtype=torch.bool), vocab_size=V
        )


def test_pad_batch_and_chunk_documents():
    docs = [np.arange(2, 12, dtype=np.int32), np.arange(2, 5, dtype=np.int32)]
    out = pad_batch(docs, max_len=8)
    assert out["input_ids"].shape == (2, 8) and out["input_ids"].dtype == torch.long
    assert out["input_ids"][0].tolist() == list(range(2, 10))  # truncated at max_len
    assert out["input_ids"][1].tolist() == [2, 3, 4, 0, 0, 0, 0, 0]
    assert out["valid"].sum(1).tolist() == [8, 3] and torch.equal(
        out["attention_mask"], out["valid"]
    )
    assert pad_batch(docs[1:], max_len=8)["input_ids"].shape == (1, 3)  # longest in batch

    pieces = chunk_documents([np.arange(9), np.arange(2)], max_len=4, min_len=2)
    assert [p.tolist() for p in pieces] == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1]]


def test_collator_wraps_layout_and_is_deterministic():
    rng = np.random.default_rng(0)
    docs = [rng.integers(2, V, size=n).astype(np.int32) for n in (5, 50, 100, 7)]

    def layout(batch):
        out = pad_batch(batch, max_len=64)
        out["document_ids"] = torch.zeros_like(out["input_ids"])  # passed through
        return out

    collate = MLMCollator(layout, vocab_size=V, seed=1)
    out = collate(docs)
    assert set(out) == {
        "input_ids",
        "valid",
        "attention_mask",
        "document_ids",
        "predict_positions",
        "labels",
    }
    assert out["predict_positions"].shape == (4, 10)
    fresh = MLMCollator(layout, vocab_size=V, seed=1)(docs)
    assert torch.equal(out["input_ids"], fresh["input_ids"])
    assert torch.equal(out["labels"], fresh["labels"])
    second = collate(docs)  # the generator advances between batches
    assert not torch.equal(second["predict_positions"], out["predict_positions"])
    collate.set_epoch(1)
    other_epoch = MLMCollator(layout, vocab_size=V, seed=1)
    other_epoch.set_epoch(1)
    assert torch.equal(collate(docs)["labels"], other_epoch(docs)["labels"])

    with pytest.raises(StokerError, match="'valid'"):
        MLMCollator(lambda b: {"input_ids": torch.zeros(1, 4, dtype=torch.long)}, vocab_size=V)(
            docs
        )


def test_collator_in_dataloader_workers_differs_per_worker():
    docs = [np.arange(2, 40, dtype=np.int32)] * 8
    collate = MLMCollator(functools.partial(pad_batch, max_len=64), vocab_size=V, seed=0)
    loader = torch.utils.data.DataLoader(docs, batch_size=4, collate_fn=collate, num_workers=2)
    first, second = list(loader)
    assert not torch.equal(first["predict_positions"], second["predict_positions"])
    again = list(loader)
    assert torch.equal(again[0]["input_ids"], first["input_ids"])


def test_mlm_loss_and_accuracy():
    logits = torch.randn(2, 3, 5)
    labels = torch.tensor([[1, IGNORE_INDEX, 4], [0, 2, IGNORE_INDEX]])
    loss, n = mlm_loss(logits, labels)
    keep = labels != IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
    assert torch.allclose(loss, expected) and n.item() == 4 and isinstance(n, torch.Tensor)
    empty_loss, zero = mlm_loss(logits, torch.full_like(labels, IGNORE_INDEX))
    assert empty_loss.item() == 0.0 and zero.item() == 0
    perfect = torch.nn.functional.one_hot(labels.clamp(min=0), 5).float()
    correct, counted = mlm_accuracy(perfect, labels)
    assert correct.item() == counted.item() == 4


def test_unigram_baseline():
    train = [np.array([5, 5, 5, 6, 1, 1, 1, 1], dtype=np.int32)]  # 1 is special: never picked
    val = [np.array([5, 6, 7, 5], dtype=np.int32)]
    base = unigram_baseline(train, val, vocab_size=10)
    assert base.token_id == 5 and base.accuracy == 0.5
    probs = (np.array([0, 0, 0, 0, 0, 3, 1, 0, 0, 0]) + 1) / (4 + 10)
    expected = -(2 * np.log(probs[5]) + np.log(probs[6]) + np.log(probs[7])) / 4
    assert base.loss == pytest.approx(expected)
