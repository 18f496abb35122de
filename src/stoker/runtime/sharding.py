"""FSDP2 sharding and activation checkpointing of a model's repeated blocks.

Two verbs on a plain ``nn.Module``, usable without :class:`~stoker.Stoker`:

- :func:`shard_model`: ``fully_shard`` (FSDP2, DTensor parameters) on each *block*, then on the
  root. A block is one unit of all-gather / reduce-scatter: its parameters are gathered just
  before its forward (and again before its backward) and freed after, so a process holds its
  own 1/N of every parameter, gradient and optimizer state plus about one block unsharded.
- :func:`activation_checkpointing`: each block's forward runs under non-reentrant
  ``torch.utils.checkpoint``: its inner activations are dropped after the forward and
  recomputed in the backward (about one extra forward of the blocks, for activation memory
  that no longer grows with the block's inner width).

Both pick blocks the same way (:func:`select_blocks`): by default every entry of every
``nn.ModuleList`` (the repeated layers of a transformer); or the instances of a list of module
classes; or the modules for which ``fn(name, module)`` is true. Apply activation checkpointing
*first*, then sharding (each sharded block is then the checkpoint wrapper around it, as in
torchtitan), then build the optimizer over the (now DTensor) parameters::

    mesh = init_device_mesh("cpu", (world_size,))
    activation_checkpointing(model)              # optional; also works under DDP
    shard_model(model, mesh=mesh, mixed_precision="bf16")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

The training step is unchanged: the mesh's gradients are *averaged* (reduce-scatter divides by
the world size, as DDP's all-reduce does), so a loss normalised by the global token count is
``local_sum * world_size / global_tokens``. In an accumulation window call
``model.set_requires_gradient_sync(False)`` before every micro-batch but the last (the
equivalent of DDP's ``no_sync``): gradients then accumulate unsharded and are reduce-scattered
once. ``torch.nn.utils.clip_grad_norm_`` over the DTensor parameters returns the global norm.

Limits:

- Sharding replaces every parameter by a DTensor: build the optimizer *after*
  :func:`shard_model`; ``model.state_dict()`` holds shards (use
  :mod:`stoker.checkpoint.sharded`, or ``.full_tensor()``). A block's parameters are
  gathered only around *its own* forward: one used elsewhere (a tied embedding read by the
  output head, ``Encoder.tok_emb``) must not be in a block of its own but belong to the
  root, as with the default selection; parameters shared by two blocks are not supported.
- ``mixed_precision="bf16"`` computes in bf16 with fp32 master weights, optimizer state and
  gradient reduction; the root returns fp32 outputs. On CPUs without AMX bf16 matrix products
  can be much slower than fp32 (see :func:`stoker.runtime.hardware.bf16_is_fast`).
- Activation checkpointing replaces each block in its parent by a ``CheckpointWrapper``:
  state-dict keys are unchanged (the wrapper strips its prefix), but ``named_parameters()``
  shows ``_checkpoint_wrapped_module.`` and ``isinstance`` checks on the parent's entries see
  the wrapper. The block's forward runs twice: it must not have side effects beyond its output
  (BatchNorm running statistics would update twice); dropout masks are replayed exactly (the
  RNG state is saved and restored). Nested selected blocks are checkpointed at the outermost
  only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Literal, TypeAlias

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    CheckpointWrapper,
    checkpoint_wrapper,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

__all__ = [
    "MIXED_PRECISIONS",
    "BlockSelector",
    "activation_checkpointing",
    "select_blocks",
    "shard_model",
]

logger = logging.getLogger(__name__)

BlockSelector: TypeAlias = "Sequence[type[nn.Module]] | Callable[[str, nn.Module], bool] | None"
"""``None`` (every ``nn.ModuleList`` entry), module classes, or ``fn(name, module) -> bool``."""

MIXED_PRECISIONS = ("fp32", "bf16")

_WRAPPED = "._checkpoint_wrapped_module"


def select_blocks(model: nn.Module, blocks: BlockSelector = None) -> list[tuple[str, nn.Module]]:
    """The blocks of ``model`` in pre-order, as ``(name, module)``; the root is never one.

    A block wrapped by :func:`activation_checkpointing` is matched by what it wraps, under its
    unwrapped name, and returned as the wrapper (the unit to shard). For the default selector
    and ``blocks = [nn.Linear]`` on ``Sequential(Linear, ModuleList([Linear, Linear]))`` the
    blocks are ``1.0, 1.1`` and ``0, 1.0, 1.1`` respectively.
    """
    match = _matcher(model, blocks)
    selected = []
    for name, module in model.named_modules():
        if not name or name.endswith(_WRAPPED.lstrip(".")):
            continue  # the root, or the module inside a wrapper (judged through the wrapper)
        inner = (
            module._checkpoint_wrapped_module if isinstance(module, CheckpointWrapper) else module
        )
        if match(name.replace(_WRAPPED, ""), inner):
            selected.append((name.replace(_WRAPPED, ""), module))
    if blocks is not None and not selected:
        raise ValueError(
            f"blocks={blocks!r} selects no module of {type(model).__name__}; pass module classes "
            "it contains, a function (name, module) -> bool, or None for every nn.ModuleList "
            "entry."
        )
    return selected


def _matcher(model: nn.Module, blocks: BlockSelector) -> Callable[[str, nn.Module], bool]:
    if blocks is None:
        entries = set()
        for module in model.modules():
            if isinstance(module, nn.ModuleList):
                for child in module:
                    entries.add(id(child))
                    if isinstance(child, CheckpointWrapper):  # an entry already wrapped
                        entries.add(id(child._checkpoint_wrapped_module))
        return lambda name, module: id(module) in entries
    if callable(blocks) and not isinstance(blocks, type):
        return blocks
    if isinstance(blocks, type):
        blocks = [blocks]
    classes = tuple(blocks)
    if not classes or not all(isinstance(c, type) and issubclass(c, nn.Module) for c in classes):
        raise TypeError(
            f"blocks={blocks!r} must be None, a list of nn.Module subclasses or a function "
            "(name, module) -> bool."
        )
    return lambda name, module: isinstance(module, classes)


def activation_checkpointing(model: nn.Module, *, blocks: BlockSelector = None) -> nn.Module:
    """Wrap each selected block of ``model`` (in place) to recompute its activations in backward.

    Non-reentrant ``torch.utils.checkpoint`` with the RNG state preserved, so losses and
    gradients equal those without checkpointing; works under DDP and, applied before
    :func:`shard_model`, under FSDP. Returns ``model``. Raises ``ValueError`` if the model
    already has checkpointed blocks or ``blocks`` selects nothing.
    """
    if any(isinstance(m, CheckpointWrapper) for m in model.modules()):
        raise ValueError(
            "activation_checkpointing() was already applied to this model; apply it once."
        )
    if isinstance(model, FSDPModule):
        raise ValueError(
            "activation_checkpointing() must run before shard_model() (the sharded blocks "
            "must be the checkpoint wrappers)."
        )
    chosen = select_blocks(model, blocks)
    outermost = [
        (name, m)
        for name, m in chosen
        if not any(name.startswith(other + ".") for other, _ in chosen)
    ]
    if not outermost:
        logger.warning("activation_checkpointing: %s has no block to checkpoint.", type(model))
    for name, block in outermost:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        wrapper = checkpoint_wrapper(
            block, checkpoint_impl=CheckpointImpl.NO_REENTRANT, preserve_rng_state=True
        )
        setattr(parent, child, wrapper)  # a ModuleList entry "3" is set like an attribute
    return model


def shard_model(
    model: nn.Module,
    *,
    mesh: DeviceMesh | None = None,
    blocks: BlockSelector = None,
    mixed_precision: Literal["fp32", "bf16"] = "fp32",
    reshard_after_forward: bool = True,
) -> nn.Module:
    """``fully_shard`` each selected block of ``model``, then the root; returns ``model``.

    Args:
        model: on its final device; its class becomes an ``FSDPModule`` subclass in place.
        mesh: a 1-D device mesh over the data-parallel processes; default: every process of
            the default group on the device type of the model's parameters.
        blocks: which submodules are units of sharding (see :func:`select_blocks`).
        mixed_precision: ``"fp32"``, or ``"bf16"``: bf16 parameters in forward/backward, fp32
            master weights and gradient reduction, fp32 outputs from the root.
        reshard_after_forward: free each block's gathered parameters after its forward (less
            memory, one more all-gather in backward); the root is never resharded (it would be
            gathered again at once for the backward).
    """
    if mixed_precision not in MIXED_PRECISIONS:
        raise ValueError(
            f"mixed_precision={mixed_precision!r}; valid choices: {', '.join(MIXED_PRECISIONS)}."
        )
    if any(isinstance(m, FSDPModule) for m in model.modules()):
        raise ValueError("shard_model() was already applied to this model; apply it once.")
    if mesh is None:
        if not dist.is_initialized():
            raise ValueError(
                "shard_model() needs torch.distributed initialised (run under torchrun / "
                "`stoker run`) or an explicit mesh=init_device_mesh(...)."
            )
        device = next(model.parameters()).device.type
        mesh = init_device_mesh(device, (dist.get_world_size(),))
    if mixed_precision == "bf16":
        block_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        root_policy = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32, output_dtype=torch.float32
        )
    else:
        block_policy = root_policy = MixedPrecisionPolicy()
    chosen = select_blocks(model, blocks)
    # Innermost first: fully_shard on a module leaves out parameters already owned by a
    # sharded descendant, so nested blocks must be sharded before their ancestors.
    for _, block in reversed(chosen):
        fully_shard(
            block, mesh=mesh, mp_policy=block_policy, reshard_after_forward=reshard_after_forward
        )
    fully_shard(model, mesh=mesh, mp_policy=root_policy, reshard_after_forward=False)
    return model
