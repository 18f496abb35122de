"""Packing: layout correctness, the sampler/collator contract, attention within documents."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from stoker.data.packing import (
    PackedBatchSampler,
    PackingCollator,
    PackingConfig,
    block_diagonal_mask,
    pack_rows,
    packed_attention,
)
from stoker.errors import StokerError

FAST = settings(
    max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)

configs = st.builds(
    PackingConfig,
    max_len=st.integers(1, 64),
    long_documents=st.sampled_from(["split", "truncate"]),
)
lengths_st = st.lists(st.integers(0, 200), min_size=0, max_size=40)


def _docs(lengths):
    """Document d holds tokens d*1000, d*1000+1, ...: each token says where it came from."""
    return [np.arange(n, dtype=np.int64) + 1000 * (d + 1) for d, n in enumerate(lengths)]


def test_worked_example_of_the_docstring():
    cfg = PackingConfig(max_len=6)
    assert pack_rows([3, 2, 6], cfg) == [[(2, 0, 6)], [(0, 0, 3), (1, 0, 2)]]
    out = PackingCollator(cfg, pad_id=0)([np.arange(1, 4), np.arange(10, 12), np.arange(20, 26)])
    assert out["document_ids"].tolist() == [[0, 0, 0, 0, 0, 0], [0, 0, 0, 1, 1, -1]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 1, 0]]
    assert out["cu_seqlens"].tolist() == [0, 6, 9, 11, 12]
    assert out["input_ids"].tolist() == [[20, 21, 22, 23, 24, 25], [1, 2, 3, 10, 11, 0]]
    assert out["valid"].tolist() == [[True] * 6, [True] * 5 + [False]]


@FAST
@given(lengths_st, configs)
def test_every_token_once_in_order_and_offsets_consistent(lengths, cfg):
    docs = _docs(lengths)
    out = PackingCollator(cfg, pad_id=-5)(docs)
    ids, valid = out["input_ids"].numpy(), out["valid"].numpy()
    doc_ids, pos = out["document_ids"].numpy(), out["position_ids"].numpy()
    b, t = ids.shape
    assert t == cfg.max_len and valid.tolist() == (doc_ids >= 0).tolist()
    assert (ids[~valid] == -5).all() and (pos[~valid] == 0).all()

    pieces = {}  # document -> list of token runs, one per segment
    cu = out["cu_seqlens"].tolist()
    assert cu[0] == 0 and cu[-1] == b * t and all(x < y for x, y in itertools.pairwise(cu))
    bounds = set(cu)
    for r in range(b):
        for seg in np.unique(doc_ids[r][doc_ids[r] >= 0]):
            cols = np.flatnonzero(doc_ids[r] == seg)
            assert (np.diff(cols) == 1).all()  # a segment is contiguous
            assert pos[r, cols].tolist() == list(range(len(cols)))  # positions restart at 0
            assert r * t + cols[0] in bounds and r * t + cols[-1] + 1 in bounds
            tokens = ids[r, cols]
            owner = int(tokens[0] // 1000) - 1
            assert (tokens // 1000 - 1 == owner).all() and (np.diff(tokens) == 1).all()
            pieces.setdefault(owner, []).append(tokens)
    # Segments are exactly the documents' pieces: cu_seqlens has one boundary per segment
    # end plus one per row with trailing padding.
    n_segments = sum(len(p) for p in pieces.values())
    padded_rows = int((~valid[:, -1]).sum())
    assert len(cu) - 1 == n_segments + padded_rows
    for d, doc in enumerate(docs):
        kept = doc if cfg.long_documents == "split" else doc[: cfg.max_len]
        got = np.concatenate(sorted(pieces.get(d, []), key=lambda p: p[0])) if len(kept) else []
        assert list(got) == kept.tolist()  # every token exactly once, in order


@FAST
@given(lengths_st, configs, st.data())
def test_a_subset_of_rows_repacks_into_the_same_rows(lengths, cfg, data):
    """What lets PackedBatchSampler plan rows that PackingCollator reproduces."""
    rows = pack_rows(lengths, cfg)
    if not rows:
        return
    chosen = data.draw(st.sets(st.integers(0, len(rows) - 1), min_size=1))
    docs = {doc for r in chosen for doc, _, _ in rows[r]}
    # Close under split documents: take every row that holds a piece of a chosen document.
    chosen = {r for r, row in enumerate(rows) if any(doc in docs for doc, _, _ in row)}
    docs = sorted({doc for r in chosen for doc, _, _ in rows[r]})
    again = pack_rows([lengths[d] for d in docs], cfg)
    as_sets = sorted(sorted((docs[d], a, b) for d, a, b in row) for row in again)
    assert as_sets == sorted(sorted(rows[r]) for r in chosen)


@FAST
@given(
    st.lists(st.integers(0, 150), min_size=1, max_size=120),
    st.integers(1, 4),
    st.sampled_from(["split", "truncate"]),
    st.integers(0, 1000),
)
def test_sampler_batches_collate_into_fixed_rows(lengths, extra_rows, mode, seed):
    cfg0 = PackingConfig(max_len=48, long_documents=mode)
    cfg = PackingConfig(
        max_len=48, rows=max(1, *map(cfg0.rows_alone, lengths)) + extra_rows, long_documents=mode
    )
    docs = _docs(lengths)
    sampler = PackedBatchSampler(lengths, cfg, window=32, seed=seed)
    loader = DataLoader(docs, batch_sampler=sampler, collate_fn=PackingCollator(cfg))
    total = 0
    for batch in loader:
        assert batch["input_ids"].shape == (cfg.rows, cfg.max_len)
        total += int(batch["valid"].sum())
    kept = sum(n if mode == "split" else min(n, 48) for n in lengths)
    assert total == kept


def test_rows_none_grows_and_fixed_rows_refuses_overflow():
    docs = _docs([40, 40, 40])
    assert PackingCollator(PackingConfig(max_len=64))(docs)["input_ids"].shape == (3, 64)
    empty = PackingCollator(PackingConfig(max_len=8, rows=2))([])
    assert empty["input_ids"].shape == (2, 8) and not empty["valid"].any()
    with pytest.raises(StokerError, match="PackedBatchSampler"):
        PackingCollator(PackingConfig(max_len=64, rows=2))(docs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_len": 0}, "max_len"),
        ({"max_len": 8, "rows": 0}, "rows"),
        ({"max_len": 8, "long_documents": "drop"}, "split, truncate"),
    ],
)
def test_config_errors_list_valid_values(kwargs, match):
    with pytest.raises(StokerError, match=match):
        PackingConfig(**kwargs)


def test_block_diagonal_mask_docstring_example():
    mask = block_diagonal_mask(torch.tensor([[0, 0, 1, -1]]))
    assert mask.shape == (1, 1, 4, 4)
    assert mask[0, 0].tolist() == [
        [True, True, False, False],
        [True, True, False, False],
        [False, False, True, False],
        [False, False, False, True],
    ]


def _per_document_attention(q, k, v, document_ids):
    """Reference: each segment alone through SDPA, no mask at all."""
    out = torch.zeros_like(q)
    for r in range(q.shape[0]):
        for seg in document_ids[r].unique().tolist():
            cols = (document_ids[r] == seg).nonzero().squeeze(1)
            out[r, :, cols] = F.scaled_dot_product_attention(
                q[r : r + 1, :, cols], k[r : r + 1, :, cols], v[r : r + 1, :, cols]
            )[0]
    return out


@FAST
@given(st.lists(st.integers(1, 70), min_size=1, max_size=12), st.integers(0, 2**31))
def test_packed_attention_equals_per_document_attention(lengths, seed):
    batch = PackingCollator(PackingConfig(max_len=64))(_docs(lengths))
    doc_ids = batch["document_ids"]
    g = torch.Generator().manual_seed(seed)
    b, t = doc_ids.shape
    q, k, v = (torch.randn(b, 2, t, 16, generator=g) for _ in range(3))
    packed = packed_attention(q, k, v, doc_ids, backend="sdpa")
    reference = _per_document_attention(q, k, v, doc_ids)
    valid = batch["valid"][:, None, :, None].expand_as(packed)
    assert (packed - reference)[valid].abs().max() <= 1e-5
    assert torch.isfinite(packed).all()  # padding rows attend to padding, never to nothing


@pytest.mark.slow  # compiles FlexAttention (~20-40 s on 2 cores)
def test_flex_backend_matches_sdpa():
    batch = PackingCollator(PackingConfig(max_len=128))(_docs([50, 30, 100, 7, 64, 64]))
    g = torch.Generator().manual_seed(0)
    b, t = batch["document_ids"].shape
    q, k, v = (torch.randn(b, 2, t, 16, generator=g) for _ in range(3))
    flex = packed_attention(q, k, v, batch["document_ids"], backend="flex")
    sdpa = packed_attention(q, k, v, batch["document_ids"], backend="sdpa")
    assert (flex - sdpa).abs().max() <= 1e-5


def test_packed_encoder_equals_each_document_alone():
    """Stoker's encoder, fed a packed batch, gives each document the logits it gets alone."""
    from stoker.models.encoder import Encoder, EncoderConfig

    torch.manual_seed(0)
    model = Encoder(EncoderConfig.preset("tiny", vocab_size=300, max_len=64)).eval()
    lengths = [20, 64, 5, 33, 1, 40]
    rng = np.random.default_rng(0)
    docs = [rng.integers(2, 300, size=n) for n in lengths]
    batch = PackingCollator(PackingConfig(max_len=64))(docs)
    with torch.no_grad():
        packed = model(
            batch["input_ids"],
            document_ids=batch["document_ids"],
            position_ids=batch["position_ids"],
        )
        diffs = []
        for r, row in enumerate(pack_rows(lengths, PackingConfig(max_len=64))):
            col = 0
            for d, start, stop in row:
                alone = model(torch.as_tensor(docs[d][start:stop])[None])
                diffs.append((packed[r, col : col + stop - start] - alone[0]).abs().max())
                col += stop - start
    assert len(diffs) == len(lengths) and max(diffs) <= 1e-5


def test_sampler_errors():
    with pytest.raises(StokerError, match="window"):
        PackedBatchSampler([3], PackingConfig(max_len=8, rows=1), window=0)
