"""Pruning: global magnitude, 2:4 semi-structured, and structured (heads and FFN neurons).

Unstructured and 2:4 pruning return a mask per pruned weight; :func:`keep_pruned` re-applies the
masks after every optimizer step so that fine-tuning cannot regrow what was removed. Structured
pruning needs no mask: the removed rows and columns are gone, and the result is an ordinary,
smaller :class:`~stoker.models.Encoder`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from stoker.errors import StokerError
from stoker.models import Encoder

__all__ = [
    "keep_pruned",
    "magnitude_prune",
    "prunable_linears",
    "semi_structured_prune",
    "structured_prune",
]

Masks = dict[str, Tensor]


def prunable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The linear layers pruning and quantization act on, by qualified name.

    For an :class:`Encoder`: the four projections of every block (the embedding, tied to the
    output head, stays dense). For any other module: every ``nn.Linear``.
    """
    root = model.blocks if isinstance(model, Encoder) else model
    prefix = "blocks." if isinstance(model, Encoder) else ""
    return {f"{prefix}{name}": m for name, m in root.named_modules() if isinstance(m, nn.Linear)}


@torch.no_grad()
def magnitude_prune(model: nn.Module, sparsity: float) -> Masks:
    """Zero exactly ``round(sparsity * n)`` of the ``n`` prunable weights, smallest |w| first.

    The threshold is global: layers whose weights are small lose more of them.
    """
    layers = prunable_linears(model)
    if not layers:
        raise StokerError("magnitude pruning found no nn.Linear layer in the model.")
    flat = torch.cat([m.weight.detach().abs().flatten().float() for m in layers.values()])
    k = round(sparsity * flat.numel())
    drop = torch.zeros(flat.numel(), dtype=torch.bool)
    if k:
        # topk on indices, not a threshold: ties at the threshold would make the count inexact.
        drop[torch.topk(flat, k, largest=False, sorted=False).indices] = True
    masks, start = {}, 0
    for name, m in layers.items():
        n = m.weight.numel()
        keep = ~drop[start : start + n].view_as(m.weight)
        start += n
        m.weight.mul_(keep.to(m.weight.dtype))
        masks[f"{name}.weight"] = keep
    return masks


@torch.no_grad()
def semi_structured_prune(model: nn.Module) -> Masks:
    """2:4 sparsity: of every 4 consecutive weights along a row, keep the 2 largest |w|."""
    masks = {}
    for name, m in prunable_linears(model).items():
        w = m.weight
        if w.size(1) % 4:
            raise StokerError(
                f"2:4 pruning needs input widths divisible by 4; {name} has {w.size(1)}."
            )
        groups = w.detach().abs().reshape(-1, 4)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(1, groups.topk(2, dim=1).indices, True)
        keep = keep.view_as(w)
        w.mul_(keep.to(w.dtype))
        masks[f"{name}.weight"] = keep
    return masks


def keep_pruned(
    model: nn.Module, optimizer: torch.optim.Optimizer, masks: Masks
) -> Callable[[], None]:
    """Re-zero the pruned weights after every ``optimizer.step()``; returns the remover."""
    params = dict(model.named_parameters())
    pairs = [(params[name], mask) for name, mask in masks.items()]

    def reapply(*_: object) -> None:
        with torch.no_grad():
            for p, mask in pairs:
                p.mul_(mask.to(p.device, p.dtype))

    handle = optimizer.register_step_post_hook(reapply)
    return handle.remove


def _keep_rows(layer: nn.Linear, rows: Tensor) -> nn.Linear:
    new = nn.Linear(layer.in_features, len(rows), bias=layer.bias is not None)
    new.weight.data = layer.weight.data[rows].clone()
    if layer.bias is not None:
        new.bias.data = layer.bias.data[rows].clone()
    return new


def _keep_columns(layer: nn.Linear, cols: Tensor) -> nn.Linear:
    new = nn.Linear(len(cols), layer.out_features, bias=layer.bias is not None)
    new.weight.data = layer.weight.data[:, cols].clone()
    if layer.bias is not None:
        new.bias.data = layer.bias.data.clone()
    return new


def _top(scores: Tensor, keep: int) -> Tensor:
    """Indices of the ``keep`` highest scores, in their original order."""
    return scores.topk(keep).indices.sort().values


@torch.no_grad()
def structured_prune(model: Encoder, ffn_sparsity: float, head_sparsity: float = 0.0) -> Encoder:
    """A smaller dense :class:`Encoder`: the same fraction of FFN neurons and heads cut per block.

    Importance of FFN neuron j: ||row j of mlp_in|| * ||column j of mlp_out|| (what flows in
    times what flows out). Importance of a head: the same product over its q/k/v rows of
    ``qkv`` and its columns of ``attn_out``. Every block keeps the same widths so the result
    has one :class:`EncoderConfig`; ``model`` itself is left unchanged.
    """
    if not isinstance(model, Encoder):
        raise StokerError(
            "structured pruning removes heads and FFN neurons of a stoker.models.Encoder; "
            f"got {type(model).__name__}. Use --prune magnitude or 2:4 for other models."
        )
    cfg = model.config
    ffn_keep = cfg.ffn_dim - round(ffn_sparsity * cfg.ffn_dim)
    heads_keep = cfg.heads - round(head_sparsity * cfg.heads)
    if ffn_keep < 1 or heads_keep < 1:
        raise StokerError(
            f"structured pruning at {ffn_sparsity:.0%} FFN / {head_sparsity:.0%} heads leaves "
            f"{ffn_keep} neurons and {heads_keep} heads per block; lower the sparsity."
        )
    head_dim = cfg.attn_dim // cfg.heads
    new_cfg = dataclasses.replace(cfg, ffn_dim=ffn_keep, heads=heads_keep, head_dim=head_dim)
    pruned = Encoder(new_cfg)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("blocks.")}
    pruned.load_state_dict(state, strict=False)
    old: Any
    new: Any
    for old, new in zip(model.blocks, pruned.blocks, strict=True):
        neuron = old.mlp_in.weight.norm(dim=1) * old.mlp_out.weight.norm(dim=0)
        keep = _top(neuron, ffn_keep)
        new.mlp_in = _keep_rows(old.mlp_in, keep)
        new.mlp_out = _keep_columns(old.mlp_out, keep)

        a = cfg.attn_dim
        qkv_rows = old.qkv.weight.view(3, cfg.heads, head_dim, -1)  # [3, H, hd, D]
        out_cols = old.attn_out.weight.view(-1, cfg.heads, head_dim)  # [D, H, hd]
        head = qkv_rows.pow(2).sum(dim=(0, 2, 3)).sqrt() * out_cols.pow(2).sum(dim=(0, 2)).sqrt()
        heads = _top(head, heads_keep)
        # rows of qkv for the kept heads, in q, k, v order; columns of attn_out likewise.
        cols = (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()
        rows = torch.cat([part * a + cols for part in range(3)])
        new.qkv = _keep_rows(old.qkv, rows)
        new.attn_out = _keep_columns(old.attn_out, cols)
        new.heads = heads_keep
        for name in ("attn_norm", "mlp_norm"):
            getattr(new, name).load_state_dict(getattr(old, name).state_dict())
    return pruned.train(model.training)
