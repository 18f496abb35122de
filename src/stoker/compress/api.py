"""``compress(model, PruneConfig(...), QuantConfig(...))``: the verb, and its result."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from stoker.compress.artifact import write_artifact
from stoker.compress.config import PruneConfig, QuantConfig
from stoker.compress.finetune import finetune
from stoker.compress.prune import (
    Masks,
    magnitude_prune,
    prunable_linears,
    semi_structured_prune,
    structured_prune,
)
from stoker.compress.quantize import build_runnable, snap_to_int8_
from stoker.data.loaders import model_inputs
from stoker.errors import StokerError
from stoker.models import Encoder

__all__ = ["Compressed", "compress"]


class Compressed:
    """A compressed encoder before it is saved: fp32 master weights plus what quantization
    needs. :meth:`save` writes the file :func:`~stoker.compress.load_compressed` serves."""

    def __init__(
        self,
        model: Encoder,
        prune: PruneConfig,
        quant: QuantConfig,
        *,
        int8: dict[str, tuple[Tensor, Tensor]],
        observers: dict[str, Tensor],
        info: dict[str, Any],
    ) -> None:
        self.model = model
        """The pruned (and, for int8, grid-rounded) fp32 encoder the file is made from."""
        self.prune = prune
        self.quant = quant
        self.int8 = int8
        self.observers = observers
        self.info = info

    def save(self, path: str | Path) -> Path:
        """Write the compressed model (a ``.safetensors`` file); returns its path."""
        return write_artifact(
            path,
            self.model.config,
            self.prune,
            self.quant,
            self.model.state_dict(),
            int8=self.int8,
            observers=self.observers,
            info=self.info,
        )


def _sparsity(model: Encoder) -> float:
    weights = [m.weight for m in prunable_linears(model).values()]
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / sum(w.numel() for w in weights)


def compress(
    model: Encoder,
    prune: PruneConfig | None = None,
    quant: QuantConfig | None = None,
    *,
    train_loader: DataLoader | None = None,
    on_finetune_step: Callable[[int, Tensor], None] | None = None,
) -> Compressed:
    """Prune, optionally fine-tune, then prepare quantization of a copy of ``model``.

    ``train_loader`` (MLM batches, e.g. :func:`stoker.data.mlm_loader` on the train split)
    feeds the fine-tune and int8-static's calibration; ``model`` itself is not modified.
    """
    prune, quant = prune or PruneConfig(), quant or QuantConfig()
    if not isinstance(model, Encoder):
        raise StokerError(
            f"compress() takes a stoker.models.Encoder, got {type(model).__name__}; for other "
            "models use stoker.compress.magnitude_prune / semi_structured_prune directly."
        )
    needs_data = prune.finetune_steps > 0 or quant.method == "int8-static"
    if needs_data and train_loader is None:
        raise StokerError(
            "fine-tuning and int8-static calibration read training batches: pass "
            "train_loader=stoker.data.mlm_loader(train documents, ...)."
        )
    # A fresh module from the weights, not a deepcopy: a model that went through
    # Stoker.prepare carries its autocast forward wrapper, which torch.export would trace.
    work = Encoder(model.config)
    work.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    work.eval()
    masks: Masks = {}
    params_before = sum(p.numel() for p in work.parameters())
    if prune.method == "magnitude":
        masks = magnitude_prune(work, prune.sparsity)
    elif prune.method == "2:4":
        masks = semi_structured_prune(work)
    elif prune.method == "structured":
        work = structured_prune(work, prune.sparsity, prune.head_sparsity)
    info: dict[str, Any] = {"params_before": params_before}
    if prune.finetune_steps:
        assert train_loader is not None
        work = finetune(
            work,
            train_loader,
            steps=prune.finetune_steps,
            lr=prune.finetune_lr,
            masks=masks,
            on_step=on_finetune_step,
        )
    work = work.float().eval()
    int8 = snap_to_int8_(work) if quant.is_int8 else {}
    if quant.computes_in_bf16:  # what the file will hold: bf16 values, computed in fp32 here
        with torch.no_grad():
            for name, param in work.named_parameters():
                if name not in int8:
                    param.copy_(param.to(torch.bfloat16).float())
    observers: dict[str, Tensor] = {}
    if quant.method == "int8-static":
        assert train_loader is not None
        batches = [
            model_inputs(b) for b in itertools.islice(train_loader, quant.calibration_batches)
        ]
        _, observers = build_runnable(copy.deepcopy(work), quant, calibration=batches)
    info["linear_sparsity"] = _sparsity(work)
    info["params"] = sum(p.numel() for p in work.parameters())
    return Compressed(work, prune, quant, int8=int8, observers=observers, info=info)
