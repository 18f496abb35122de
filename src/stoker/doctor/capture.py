"""Summarise a ``torch.profiler`` window into per-step numbers the rules read.

Works on the raw kineto events (name, thread, start, duration, input dtypes) rather than
``prof.events()``: building the FunctionEvent tree costs seconds on a loop of many small ops, and
the only structure needed is "which aten op is not inside another one", found by interval
nesting on the thread that ran the loop.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ProfileSummary", "summarize_events"]

# Leaf matrix-product kernels (their callers like aten::linear/aten::matmul are not counted, to
# count each product once).
_MATMUL_OPS = frozenset(
    {
        "aten::mm",
        "aten::addmm",
        "aten::bmm",
        "aten::baddbmm",
        "aten::_addmm_activation",
        "aten::mkldnn_convolution",
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::cudnn_convolution",
        "aten::_scaled_dot_product_flash_attention",
        "aten::_scaled_dot_product_efficient_attention",
        "aten::_scaled_dot_product_cudnn_attention",
    }
)
# The op every tensor-to-Python conversion ends in.
_SYNC_OPS = frozenset({"aten::_local_scalar_dense"})
# CUDA runtime calls where the host waits for the device.
_CUDA_SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
_INTERNAL_PREFIXES = ("Optimizer.step#", "Optimizer.zero_grad#")
_NODE_PREFIX = "autograd::engine::evaluate_function: "


@dataclass(slots=True)
class ProfileSummary:
    """Per-step means over the profiled window; times in milliseconds."""

    steps: int
    ops_per_step: float = 0.0  # top-level aten ops (what the Python code dispatched)
    busy_ms: float = 0.0  # time inside top-level ops on the loop's thread
    matmul_ms: float = 0.0
    matmul_ms_by_dtype: dict[str, float] = field(default_factory=dict)
    sync_ms: float = 0.0  # host waiting on a tensor-to-Python conversion (outside the optimizer)
    zero_grad_ms: float = 0.0
    accumulate_ms: float = 0.0  # AccumulateGrad adding into an existing .grad
    device_busy_ms: float | None = None  # CUDA: kernel time (None on CPU)
    h2d_ms: float = 0.0  # CUDA: host-to-device copies
    h2d_pageable_ms: float = 0.0  # CUDA: ... of which from pageable (unpinned) memory
    # Backward, per autograd node type ("MulBackward0"): (ms per step, nodes per step).
    backward_by_node: dict[str, tuple[float, float]] = field(default_factory=dict)
    # (op name, ms per step, calls per step), costliest first
    top_ops: list[tuple[str, float, int]] = field(default_factory=list)


def _dtype_name(raw: str) -> str:
    return {
        "float": "float32",
        "c10::BFloat16": "bfloat16",
        "c10::Half": "float16",
        "double": "float64",
    }.get(raw, raw)


def summarize_events(events: Iterable[Any], steps: int) -> ProfileSummary:
    """Summarise kineto events (``prof.profiler.kineto_results.events()``) of ``steps`` steps."""
    steps = max(1, steps)
    cpu: list[tuple[int, int, str, Any]] = []
    kernels_ns = 0
    h2d_ns = h2d_pageable_ns = 0
    cuda_sync_ns = 0
    threads: Counter[int] = Counter()
    saw_device = False
    for e in events:
        name = e.name()
        dev = str(e.device_type())
        if "CUDA" in dev:
            saw_device = True
            if "Memcpy HtoD" in name:
                h2d_ns += e.duration_ns()
                if "Pageable" in name:
                    h2d_pageable_ns += e.duration_ns()
            else:
                kernels_ns += e.duration_ns()
            continue
        if name.startswith(_CUDA_SYNC_CALLS):
            cuda_sync_ns += e.duration_ns()
            continue
        cpu.append((e.start_ns(), e.duration_ns(), name, e))
        if name.startswith("aten::"):
            threads[e.start_thread_id()] += 1
    out = ProfileSummary(steps=steps)
    if not threads:
        return out
    main = threads.most_common(1)[0][0]
    # Events on the loop's thread, outer before inner: by start, longer first.
    mine = sorted((c for c in cpu if c[3].start_thread_id() == main), key=lambda c: (c[0], -c[1]))
    open_ends: list[tuple[int, str]] = []  # enclosing (end_ns, name), innermost last
    top_ns = 0
    top_count = 0
    sync_ns = zero_ns = acc_ns = 0
    matmul: Counter[str] = Counter()
    per_op_ns: Counter[str] = Counter()
    per_op_calls: Counter[str] = Counter()
    node_ns: Counter[str] = Counter()
    node_calls: Counter[str] = Counter()
    for start, dur, name, ev in mine:
        while open_ends and open_ends[-1][0] <= start:
            open_ends.pop()
        enclosing = [n for _, n in open_ends]
        is_aten = name.startswith("aten::")
        if is_aten and not any(n.startswith("aten::") for n in enclosing):
            top_ns += dur
            top_count += 1
            per_op_ns[name] += dur
            per_op_calls[name] += 1
        internal = any(n.startswith(_INTERNAL_PREFIXES) for n in enclosing)
        if name in _SYNC_OPS and not internal:
            sync_ns += dur
        if name.startswith("Optimizer.zero_grad#"):
            zero_ns += dur
        if name == "aten::add_" and enclosing and enclosing[-1].endswith("AccumulateGrad"):
            acc_ns += dur
        if name.startswith(_NODE_PREFIX):
            node = name[len(_NODE_PREFIX) :]
            node_ns[node] += dur
            node_calls[node] += 1
        if name in _MATMUL_OPS:
            dtypes = ev.dtypes()
            matmul[_dtype_name(dtypes[0]) if dtypes else "unknown"] += dur
        open_ends.append((start + dur, name))
    ms = 1e-6 / steps
    out.ops_per_step = top_count / steps
    out.busy_ms = top_ns * ms
    out.matmul_ms = sum(matmul.values()) * ms
    out.matmul_ms_by_dtype = {k: v * ms for k, v in matmul.items()}
    out.sync_ms = (sync_ns + cuda_sync_ns) * ms
    out.zero_grad_ms = zero_ns * ms
    out.accumulate_ms = acc_ns * ms
    out.backward_by_node = {n: (node_ns[n] * ms, node_calls[n] / steps) for n in node_ns}
    out.top_ops = [
        (n, per_op_ns[n] * ms, round(per_op_calls[n] / steps)) for n, _ in per_op_ns.most_common(8)
    ]
    if saw_device:
        out.device_busy_ms = kernels_ns * ms
        out.h2d_ms = h2d_ns * ms
        out.h2d_pageable_ms = h2d_pageable_ns * ms
    return out
