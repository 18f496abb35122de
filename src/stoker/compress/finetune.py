"""A short MLM fine-tune after pruning, run by the stoker runtime (pruned weights stay zero)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import DataLoader

from stoker.compress.prune import Masks, keep_pruned
from stoker.data.loaders import model_inputs
from stoker.data.mlm import mlm_loss
from stoker.models import Encoder
from stoker.runtime import Stoker
from stoker.schedules import warmup_cosine

__all__ = ["finetune"]


def finetune(
    model: Encoder,
    loader: DataLoader,
    *,
    steps: int,
    lr: float,
    masks: Masks | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
) -> Encoder:
    """``steps`` AdamW steps of masked-token loss on ``loader``'s batches; returns the model.

    Precision, device and the loop are the runtime's (bf16 autocast where bf16 is measured
    fast). ``masks`` (from unstructured / 2:4 pruning) are re-applied after each step.
    ``on_step(step, loss)`` gets the loss as a device tensor: reading it is the caller's sync,
    not this loop's.
    """
    stoker = Stoker(seed=0, record=False, doctor=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    remove = keep_pruned(model, optimizer, masks or {})
    scheduler = warmup_cosine(optimizer, warmup_steps=max(1, steps // 10), total_steps=steps)
    net, opt, batches, sched = stoker.prepare(model.train(), optimizer, loader, scheduler=scheduler)
    try:
        while stoker.step < steps:
            for batch in batches:
                with stoker.accumulate(net):
                    loss, n = mlm_loss(net(**model_inputs(batch)), batch["labels"])
                    stoker.backward(loss, tokens=n)
                    stoker.clip_grad_norm_(1.0)
                    opt.step()
                    sched.step()
                    opt.zero_grad()
                if on_step is not None:
                    on_step(stoker.step, loss.detach())
                if stoker.step >= steps:
                    break
    finally:
        remove()
        stoker.close()
    # prepare() wrapped the model, it never patched it: its forward is its own (torch.export,
    # int8-static, traces no autocast), so the trained module itself is the result.
    return model.eval()
