"""Encoder shapes, attention layouts (padding, documents), gather head, presets."""

from __future__ import annotations

import pytest
import torch

from stoker.errors import StokerError
from stoker.models import PRESETS, Encoder, EncoderConfig

V = 97


@pytest.fixture(scope="module")
def model() -> Encoder:
    torch.manual_seed(0)
    cfg = EncoderConfig(vocab_size=V, max_len=32, dim=32, layers=2, heads=4, ffn_dim=64)
    return Encoder(cfg).eval()


def test_shapes_in_all_three_modes(model: Encoder):
    ids = torch.randint(2, V, (3, 10))
    assert model(ids).shape == (3, 10, V)
    mask = torch.ones(3, 10, dtype=torch.bool)
    assert model(ids, attention_mask=mask).shape == (3, 10, V)
    docs = torch.tensor([[0] * 5 + [1] * 5] * 3)
    assert model(ids, document_ids=docs).shape == (3, 10, V)
    pos = torch.tensor([[0, 3], [1, 9], [4, 5]])
    assert model(ids, document_ids=docs, predict_positions=pos).shape == (3, 2, V)


def test_full_attention_equals_all_true_mask(model: Encoder):
    ids = torch.randint(2, V, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.bool)
    torch.testing.assert_close(model(ids), model(ids, attention_mask=mask), atol=1e-5, rtol=0)


def test_padding_invariance(model: Encoder):
    ids = torch.randint(2, V, (1, 7))
    alone = model(ids)
    padded_ids = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    other = torch.randint(2, V, (1, 12))
    batch = torch.cat([padded_ids, other])
    mask = torch.tensor([[True] * 7 + [False] * 5, [True] * 12])
    out = model(batch, attention_mask=mask)
    torch.testing.assert_close(out[0, :7], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], model(other)[0], atol=1e-5, rtol=0)
    assert torch.isfinite(out).all()
    # a row that is entirely padding gives finite values rather than NaN
    all_pad = model(batch, attention_mask=torch.zeros_like(mask))
    assert torch.isfinite(all_pad).all()


def test_document_isolation(model: Encoder):
    ids = torch.randint(2, V, (1, 12))
    docs = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 1, -1, -1, -1]])
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 0, 0]])
    out = model(ids, document_ids=docs, position_ids=positions)
    changed = ids.clone()
    changed[0, 5:9] = torch.randint(2, V, (4,))
    out_changed = model(changed, document_ids=docs, position_ids=positions)
    torch.testing.assert_close(out[0, :5], out_changed[0, :5], atol=1e-5, rtol=0)
    assert not torch.allclose(out[0, 5:9], out_changed[0, 5:9])
    # and doc 0 sees exactly what it would see alone
    torch.testing.assert_close(out[0, :5], model(ids[:, :5])[0], atol=1e-5, rtol=0)
    assert torch.isfinite(out).all()  # padding (-1) rows attend to each other, no NaN


def test_document_ids_with_attention_mask(model: Encoder):
    ids = torch.randint(2, V, (1, 8))
    docs = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    mask = torch.tensor([[True] * 6 + [False] * 2])  # last two are padding inside doc 1
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])
    out = model(ids, document_ids=docs, attention_mask=mask, position_ids=pos)
    # doc 1's real tokens ignore both doc 0 and the padding keys inside doc 1
    torch.testing.assert_close(out[0, 3:6], model(ids[:, 3:6])[0], atol=1e-5, rtol=0)
    assert torch.isfinite(out).all()


def test_predict_positions_equals_slicing_full_logits(model: Encoder):
    ids = torch.randint(2, V, (3, 16))
    mask = torch.rand(3, 16) < 0.9
    mask[:, 0] = True
    full = model(ids, attention_mask=mask)
    pos = torch.stack([torch.randperm(16)[:4] for _ in range(3)])
    gathered = model(ids, attention_mask=mask, predict_positions=pos)
    expected = torch.stack([full[i, pos[i]] for i in range(3)])
    torch.testing.assert_close(gathered, expected, atol=1e-5, rtol=0)


def test_backward_and_tied_head(model: Encoder):
    m = Encoder(model.config)
    ids = torch.randint(2, V, (2, 8))
    m(ids, predict_positions=torch.tensor([[1, 2], [3, 4]])).sum().backward()
    assert m.tok_emb.weight.grad is not None and m.pos_emb.weight.grad is not None
    expected = sum(p.numel() for p in m.parameters())
    assert m.num_parameters() == expected
    assert m.num_parameters(non_embedding=True) == expected - (V + 32) * 32


def test_presets_and_config_errors():
    sizes = {
        n: Encoder(EncoderConfig.preset(n, vocab_size=8192)).num_parameters()
        for n in ("tiny", "small")
    }
    assert sizes["tiny"] < sizes["small"]
    base = EncoderConfig.preset("base", vocab_size=8192)
    non_emb = 12 * base.layers * base.dim**2  # ~85 M, BERT-base's encoder stack
    assert 80e6 < non_emb < 90e6 and base.ffn_dim == 4 * base.dim
    assert set(PRESETS) == {"tiny", "small", "base"}
    assert EncoderConfig.preset("tiny", vocab_size=10, max_len=64).max_len == 64
    with pytest.raises(StokerError, match="valid choices: tiny, small, base"):
        EncoderConfig.preset("huge", vocab_size=10)
    with pytest.raises(StokerError, match="vocab_size"):
        EncoderConfig.preset("tiny")
    with pytest.raises(StokerError, match="valid fields"):
        EncoderConfig.preset("tiny", vocab_size=10, width=3)
    with pytest.raises(StokerError, match="not divisible"):
        EncoderConfig(vocab_size=10, dim=30, heads=4)
    with pytest.raises(StokerError, match="max_len"):
        Encoder(EncoderConfig(vocab_size=10, max_len=4, dim=8, heads=2, ffn_dim=8))(
            torch.zeros(1, 5, dtype=torch.long)
        )
