"""Pruning: exact sparsity, 2:4 groups, masks that survive training, structured slicing."""

import pytest
import torch
from compress_helpers import small_encoder

from stoker.compress import (
    keep_pruned,
    magnitude_prune,
    prunable_linears,
    semi_structured_prune,
    structured_prune,
)
from stoker.data import model_inputs
from stoker.errors import StokerError


def _weights(model):
    return [m.weight for m in prunable_linears(model).values()]


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.37, 0.5, 0.9])
def test_magnitude_reaches_the_requested_sparsity_exactly(sparsity):
    model = small_encoder()
    total = sum(w.numel() for w in _weights(model))
    masks = magnitude_prune(model, sparsity)
    zeros = sum(int((w == 0).sum()) for w in _weights(model))
    assert zeros == round(sparsity * total)
    assert sum(int((~m).sum()) for m in masks.values()) == zeros


def test_magnitude_is_exact_with_tied_magnitudes():
    model = small_encoder()
    with torch.no_grad():
        for w in _weights(model):  # only four distinct magnitudes: thresholds would overshoot
            w.copy_(torch.randint(1, 5, w.shape).float())
    total = sum(w.numel() for w in _weights(model))
    magnitude_prune(model, 0.3)
    assert sum(int((w == 0).sum()) for w in _weights(model)) == round(0.3 * total)


def test_magnitude_removes_the_smallest_weights():
    model = small_encoder()
    before = torch.cat([w.detach().abs().flatten() for w in _weights(model)])
    magnitude_prune(model, 0.5)
    after = torch.cat([w.detach().flatten() for w in _weights(model)])
    assert before[after == 0].max() <= before[after != 0].min()


def test_two_four_keeps_the_two_largest_of_every_four():
    model = small_encoder()
    original = [w.detach().clone() for w in _weights(model)]
    semi_structured_prune(model)
    for w, w0 in zip(_weights(model), original, strict=True):
        groups, groups0 = w.reshape(-1, 4), w0.abs().reshape(-1, 4)
        assert ((groups != 0).sum(dim=1) == 2).all()
        kept = groups0.topk(2, dim=1).indices
        assert torch.equal(groups.gather(1, kept), w0.reshape(-1, 4).gather(1, kept))


def test_masks_survive_optimizer_steps(loader):
    from stoker.data.mlm import mlm_loss

    model = small_encoder().train()
    masks = magnitude_prune(model, 0.6)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    remove = keep_pruned(model, opt, masks)
    for batch in loader:
        mlm_loss(model(**model_inputs(batch)), batch["labels"])[0].backward()
        opt.step()
        opt.zero_grad()
    remove()
    total = sum(w.numel() for w in _weights(model))
    assert sum(int((w == 0).sum()) for w in _weights(model)) == round(0.6 * total)


def _zero_out(model, ffn_keep, heads_keep):
    """The original model with the removed neurons' and heads' weights set to zero."""
    cfg = model.config
    hd = cfg.attn_dim // cfg.heads
    with torch.no_grad():
        for block, ffn, heads in zip(model.blocks, ffn_keep, heads_keep, strict=True):
            drop = torch.ones(cfg.ffn_dim, dtype=torch.bool)
            drop[ffn] = False
            block.mlp_in.weight[drop] = 0
            block.mlp_in.bias[drop] = 0
            block.mlp_out.weight[:, drop] = 0
            gone = [h for h in range(cfg.heads) if h not in heads]
            for h in gone:
                cols = slice(h * hd, (h + 1) * hd)
                for part in range(3):
                    rows = slice(part * cfg.attn_dim + h * hd, part * cfg.attn_dim + (h + 1) * hd)
                    block.qkv.weight[rows] = 0
                    block.qkv.bias[rows] = 0
                block.attn_out.weight[:, cols] = 0
    return model


def _kept(model, ffn_sparsity, head_sparsity):
    """Which neurons / heads structured_prune keeps (by the documented importance)."""
    cfg = model.config
    hd = cfg.attn_dim // cfg.heads
    ffn, heads = [], []
    for block in model.blocks:
        score = block.mlp_in.weight.norm(dim=1) * block.mlp_out.weight.norm(dim=0)
        ffn.append(score.topk(cfg.ffn_dim - round(ffn_sparsity * cfg.ffn_dim)).indices.tolist())
        q = block.qkv.weight.view(3, cfg.heads, hd, -1).pow(2).sum(dim=(0, 2, 3)).sqrt()
        o = block.attn_out.weight.view(-1, cfg.heads, hd).pow(2).sum(dim=(0, 2)).sqrt()
        heads.append((q * o).topk(cfg.heads - round(head_sparsity * cfg.heads)).indices.tolist())
    return ffn, heads


def test_structured_pruning_equals_zeroing_the_removed_units(val_batches):
    model = small_encoder()
    pruned = structured_prune(model, 0.5, 0.5)
    assert pruned.config.ffn_dim == 32 and pruned.config.heads == 2
    assert pruned.num_parameters() < model.num_parameters()
    ffn, heads = _kept(model, 0.5, 0.5)
    reference = _zero_out(small_encoder(), ffn, heads)
    with torch.no_grad():
        for batch in val_batches[:2]:
            inputs = model_inputs(batch)
            torch.testing.assert_close(pruned(**inputs), reference(**inputs))


def test_structured_pruning_at_zero_is_the_same_model(val_batches):
    model = small_encoder()
    same = structured_prune(model, 0.0)
    inputs = model_inputs(val_batches[0])
    with torch.no_grad():
        torch.testing.assert_close(same(**inputs), model(**inputs))


def test_structured_pruning_needs_an_encoder_and_something_left():
    with pytest.raises(StokerError, match="Encoder"):
        structured_prune(torch.nn.Linear(4, 4), 0.5)  # type: ignore[arg-type]
    with pytest.raises(StokerError, match="lower the sparsity"):
        structured_prune(small_encoder(ffn_dim=4), 0.99)
