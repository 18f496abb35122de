"""FLOPs of a real step, counted once with ``torch.utils.flop_counter.FlopCounterMode``.

What counts is what MFU (model FLOPs utilization) is defined over: the matrix products and
attention a step runs, forward and backward — 2 FLOPs per multiply-add, elementwise work not
counted. Counted on the step itself, not from a formula, so a model's real shapes (pruned
heads, a tied head projected only at masked positions) are what is counted. Two caveats:
activation checkpointing re-runs forwards, and those FLOPs are counted too (hardware FLOPs
rather than model FLOPs); a compiled model's fused kernels bypass the counter, so count on
the uncompiled module.

torch 2.13's counter has no formula for the CPU flash-attention kernel that
``F.scaled_dot_product_attention`` runs on CPU, so attention would silently count zero there
(an MFU too low by the attention share); this module registers the same formulas torch uses
for the GPU kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils import flop_counter

__all__ = ["count_flops"]

_aten = torch.ops.aten


def _register_cpu_attention() -> None:
    forward = _aten._scaled_dot_product_flash_attention_for_cpu
    backward = _aten._scaled_dot_product_flash_attention_for_cpu_backward
    if forward not in flop_counter.flop_registry:

        @flop_counter.register_flop_formula(forward)
        def _forward(query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> int:
            return flop_counter.sdpa_flop_count(query, key, value)

    if backward not in flop_counter.flop_registry:

        @flop_counter.register_flop_formula(backward)
        def _backward(
            grad_out: Any, query: Any, key: Any, value: Any, *args: Any, **kwargs: Any
        ) -> int:
            return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


_register_cpu_attention()


def count_flops(step: Callable[[], Any]) -> int:
    """FLOPs of one call of ``step`` (a forward + backward, say), run once under the counter."""
    with flop_counter.FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())
