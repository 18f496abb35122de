"""How :meth:`Stoker.prepare` spreads the model over the processes: replicated (DDP) or sharded
(FSDP2), its blocks optionally under activation checkpointing, compiled if asked.

The order matters and is fixed here: activation checkpointing first (each sharded block is
then the checkpoint wrapper around a block), then sharding or DDP, then ``torch.compile``.
Sharding replaces every parameter by a new DTensor parameter, so an optimizer the user built
before ``prepare`` points at the old ones: :func:`rebind_optimizer` points its parameter
groups at the new ones, by parameter name (before its first step; after it, its state is
keyed by the old parameters and cannot follow).

Under FSDP the precision policy is FSDP's ``MixedPrecisionPolicy`` (bf16 parameters for
compute, fp32 master weights and gradient reduction, fp32 outputs), not autocast.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from stoker.errors import StokerError
from stoker.runtime.distributed import DistributedContext

__all__ = ["STRATEGIES", "FSDPConfig", "Placement", "place_model", "rebind_optimizer"]

log = logging.getLogger(__name__)

STRATEGIES = ("auto", "ddp", "fsdp")


@dataclass(frozen=True, kw_only=True, slots=True)
class FSDPConfig:
    """How ``strategy="fsdp"`` shards (``Stoker(strategy=FSDPConfig(...))``)."""

    blocks: Any = None
    """The units of sharding: None (every entry of every ``nn.ModuleList``: a transformer's
    layers), a list of module classes, or ``fn(name, module) -> bool``; see
    :func:`stoker.runtime.sharding.select_blocks`."""
    reshard_after_forward: bool = True
    """Free each block's gathered parameters after its forward (less memory, one more
    all-gather in the backward)."""


@dataclass(slots=True)
class Placement:
    """The model as :meth:`Stoker.prepare` placed it."""

    forward: nn.Module
    """What the prepared model's forward calls: the module, DDP around it, compiled or not."""
    ddp: DistributedDataParallel | None = None
    sharded: bool = False
    """Whether the module's parameters are FSDP shards (DTensors)."""
    renamed: dict[int, nn.Parameter] = field(default_factory=dict)
    """``id(old parameter) -> new parameter`` after sharding (see :func:`rebind_optimizer`)."""


def resolve_strategy(strategy: str | FSDPConfig) -> tuple[str, FSDPConfig | None]:
    """``("auto" | "ddp" | "fsdp", its FSDP config)``, or a one-line error."""
    if isinstance(strategy, FSDPConfig):
        return "fsdp", strategy
    if strategy not in STRATEGIES:
        raise StokerError(
            f"strategy={strategy!r}; use one of {', '.join(map(repr, STRATEGIES))} or "
            "stoker.FSDPConfig(...)"
        )
    return strategy, FSDPConfig() if strategy == "fsdp" else None


def place_model(
    model: nn.Module,
    *,
    fsdp: FSDPConfig | None,
    checkpointing: Any,
    dist: DistributedContext,
    device: torch.device,
    mixed_precision: Literal["fp32", "bf16"],
    compile: bool,
) -> Placement:
    """Wrap ``model`` (already on ``device``) as the strategy says; see the module docstring.

    ``checkpointing``: False, True (the default blocks) or a block selector.
    """
    if checkpointing is not False and checkpointing is not None:
        from stoker.runtime.sharding import activation_checkpointing

        blocks = None if checkpointing is True else checkpointing
        try:
            activation_checkpointing(model, blocks=blocks)
        except (TypeError, ValueError) as exc:
            raise StokerError(f"activation_checkpointing: {exc}") from None
    placed = Placement(forward=model)
    if fsdp is not None and dist.enabled:
        from torch.distributed.device_mesh import init_device_mesh

        from stoker.runtime.sharding import shard_model

        names = {id(p): name for name, p in model.named_parameters()}
        mesh = init_device_mesh(device.type, (dist.world_size,))
        try:
            shard_model(
                model,
                mesh=mesh,
                blocks=fsdp.blocks,
                mixed_precision=mixed_precision,
                reshard_after_forward=fsdp.reshard_after_forward,
            )
        except (TypeError, ValueError) as exc:
            raise StokerError(f"strategy='fsdp': {exc}") from None
        now = dict(model.named_parameters())
        placed.renamed = {old: now[name] for old, name in names.items() if name in now}
        placed.sharded = True
    elif fsdp is not None:
        log.info("strategy='fsdp' with one process: nothing to shard, the model runs whole")
    elif dist.enabled:
        device_ids = [device.index] if device.type == "cuda" else None
        placed.forward = placed.ddp = DistributedDataParallel(model, device_ids=device_ids)
    if compile:
        placed.forward = torch.compile(placed.forward)  # type: ignore[assignment]
    return placed


def rebind_optimizer(optimizer: torch.optim.Optimizer, renamed: dict[int, nn.Parameter]) -> None:
    """Point ``optimizer``'s parameter groups at the sharded parameters (see the module
    docstring); refuses an optimizer that has already stepped."""
    groups = optimizer.param_groups
    if not renamed or not any(id(p) in renamed for g in groups for p in g["params"]):
        return
    if optimizer.state:
        raise StokerError(
            f"this {type(optimizer).__name__} has already stepped: under strategy='fsdp' its "
            "parameters are replaced by shards, and its state cannot follow; create it fresh, "
            "before training, and pass it to prepare()"
        )
    for group in groups:
        group["params"] = [renamed.get(id(p), p) for p in group["params"]]
