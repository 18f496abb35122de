"""Attribution pass: which line of the user's code issued which torch calls.

``torch.profiler``'s Python stacks name the *function* (its ``def`` line, measured on torch 2.13),
not the line inside it that made the call, so after the timed window the doctor runs one or two
steps under a :class:`~torch.overrides.TorchFunctionMode` that records, for every torch call made
from Python, the innermost user frame (file:line), the call's wall time and what it was. These
steps are slower (a stack walk per call) and are never used for timing shares of the step.

Host syncs are recorded only where the *user* made the tensor-to-Python conversion: ``.item()``,
``if t:``, ``float(t)``, ``print(t)``/f-strings, ``.tolist()``, ``.numpy()``; the same
conversions made inside torch (AdamW's CPU step counter calls ``.item()``) are not the user's.
"""

from __future__ import annotations

import contextlib
import sys
import time
import types
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from stoker.doctor.frames import Site, caller_site, is_user_file

__all__ = ["Attribution", "AttributionMode", "CudaSyncWatch", "LineStats", "SyncStats"]

# Tensor-to-Python conversions: each waits for the device (a host sync on CUDA).
_SYNC_NAMES = frozenset(
    {
        "item",
        "__bool__",
        "__float__",
        "__int__",
        "__index__",
        "tolist",
        "numpy",
        "__repr__",
        "__format__",
        "is_nonzero",
        "equal",
        "allclose",
    }
)
# Calls that sync only when the tensor lives on an accelerator (data-dependent output shapes).
_DEVICE_SYNC_NAMES = frozenset({"cpu", "nonzero", "masked_select", "unique"})
_MATMUL_NAMES = frozenset(
    {
        "linear",
        "matmul",
        "mm",
        "bmm",
        "addmm",
        "baddbmm",
        "einsum",
        "conv1d",
        "conv2d",
        "conv3d",
        "scaled_dot_product_attention",
        "__matmul__",
        "bilinear",
    }
)
_ZERO_NAMES = frozenset({"zero_", "fill_", "mul_"})


@dataclass(slots=True)
class LineStats:
    """Torch calls one user line made during the attribution steps (totals, not per step).

    ``calls``/``seconds``/``names`` count only calls the line made itself (``x[i] * w``), not the
    ones torch made on its behalf inside a module or optimizer; ``fp32_matmuls`` counts both.
    """

    site: Site
    calls: int = 0
    seconds: float = 0.0
    names: Counter[str] = field(default_factory=Counter)
    fp32_matmuls: int = 0
    grad_zeroing: int = 0
    # Python time between back-to-back calls of this line (the loop's own overhead), and the
    # time of the calls whose output autograd records (each adds a node to run in backward).
    between_seconds: float = 0.0
    grad_seconds: float = 0.0
    grad_nodes: Counter[str] = field(default_factory=Counter)  # autograd node types created
    # The user's frames from this line outwards, to find the line in the training loop.
    chain: tuple[Site, ...] = ()


@dataclass(slots=True)
class SyncStats:
    """Tensor-to-Python conversions the user's code made from one line."""

    site: Site
    kinds: Counter[str] = field(default_factory=Counter)
    steps_seen: set[int] = field(default_factory=set)
    seconds: float = 0.0


@dataclass(slots=True)
class Attribution:
    """What the attribution steps saw, keyed by user line."""

    steps: int = 0
    lines: dict[Site, LineStats] = field(default_factory=dict)
    syncs: dict[Site, SyncStats] = field(default_factory=dict)


def _user_chain(frame: types.FrameType | None) -> tuple[Site, ...]:
    sites: list[Site] = []
    while frame is not None and len(sites) < 8:
        code = frame.f_code
        if is_user_file(code.co_filename):
            sites.append(Site(code.co_filename, frame.f_lineno, code.co_name))
        frame = frame.f_back
    return tuple(sites)


def _first_tensor(args: tuple[Any, ...]) -> torch.Tensor | None:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
    return None


class AttributionMode(TorchFunctionMode):
    """Records user call sites of torch calls into an :class:`Attribution` while active.

    ``grad_ids`` holds ``id()`` of the optimizers' ``.grad`` tensors so that zeroing them by hand
    (``p.grad.zero_()``) is recognised.
    """

    def __init__(self, record: Attribution, grad_ids: set[int]) -> None:
        super().__init__()
        self.record = record
        self.grad_ids = grad_ids
        self.step = 0
        self.loading = 0  # > 0 while a DataLoader fetches: its work is the loader's, not a line's
        self.in_sync_call = 0  # > 0 inside a conversion this mode already records as a sync
        self._last_direct: tuple[Site, float] | None = None  # (line, end time) of the last call
        self._last_exit_overhead = 0.0

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        enter = time.perf_counter()
        kwargs = kwargs or {}
        if self.loading:
            return func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        self.in_sync_call += name in _SYNC_NAMES or name in _DEVICE_SYNC_NAMES
        start = time.perf_counter()
        try:
            out = func(*args, **kwargs)
        finally:
            self.in_sync_call -= name in _SYNC_NAMES or name in _DEVICE_SYNC_NAMES
        end = time.perf_counter()
        with contextlib.suppress(Exception):  # never break the user's step over bookkeeping
            self._record(func, args, out, start - enter, start, end)
        self._last_exit_overhead = time.perf_counter() - end
        return out

    def _record(
        self, func: Any, args: tuple[Any, ...], out: Any, pre: float, start: float, end: float
    ) -> None:
        elapsed = end - start
        name = getattr(func, "__name__", "") or ""
        frame = sys._getframe(2)
        chain = _user_chain(frame)
        if not chain:
            return
        site = chain[0]
        # The immediate caller, past torch's dispatch (overrides.py) and the frame of ``func``
        # itself when it is a Python function (``Tensor.__repr__``, ``F.relu``): a user frame
        # means the user's line made this call directly, not through torch's own code.
        code = getattr(func, "__code__", None)
        caller: types.FrameType | None = frame
        while caller is not None and (
            caller.f_code.co_filename.endswith("torch/overrides.py") or caller.f_code is code
        ):
            caller = caller.f_back
        direct = caller is not None and is_user_file(caller.f_code.co_filename)
        tensor = _first_tensor(args)
        on_device = tensor is not None and tensor.device.type not in ("cpu", "meta")
        if direct and (name in _SYNC_NAMES or (on_device and name in _DEVICE_SYNC_NAMES)):
            sync = self.record.syncs.get(site)
            if sync is None:
                sync = self.record.syncs[site] = SyncStats(site)
            sync.kinds[name] += 1
            sync.steps_seen.add(self.step)
            sync.seconds += elapsed
            return
        stats = self.record.lines.get(site)
        if stats is None:
            stats = self.record.lines[site] = LineStats(site, chain=chain)
        if name in _MATMUL_NAMES and tensor is not None and tensor.dtype == torch.float32:
            stats.fp32_matmuls += 1
        if not direct:
            return
        stats.calls += 1
        stats.seconds += elapsed
        stats.names[name] += 1
        if isinstance(out, torch.Tensor) and out.requires_grad:
            stats.grad_seconds += elapsed
            if out.grad_fn is not None:
                stats.grad_nodes[type(out.grad_fn).__name__] += 1
        if self._last_direct is not None and self._last_direct[0] == site:
            # The gap minus this recorder's own work on both sides of it.
            gap = start - self._last_direct[1] - self._last_exit_overhead - pre
            stats.between_seconds += max(0.0, gap)
        self._last_direct = (site, end)
        if name in _ZERO_NAMES and tensor is not None and id(tensor) in self.grad_ids:
            stats.grad_zeroing += 1


class CudaSyncWatch:
    """CUDA only: syncs made inside torch ops (``x[mask]``, ``nonzero``) that no Python-level
    conversion shows, from ``torch.cuda.set_sync_debug_mode("warn")``'s warnings, attributed to
    the user's line at the time of the warning. A no-op without an initialised CUDA context."""

    def __init__(self, mode: AttributionMode) -> None:
        self.mode = mode
        self._saved: tuple[Any, Any] | None = None

    def start(self) -> None:
        if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
            return
        previous_show = warnings.showwarning
        self._saved = (torch.cuda.get_sync_debug_mode(), previous_show)

        def show(message: Any, category: Any, filename: str, lineno: int, *rest: Any) -> None:
            if "synchroniz" not in str(message):
                previous_show(message, category, filename, lineno, *rest)
                return
            if self.mode.in_sync_call:
                return  # already recorded as .item()/print/... at the user's line
            site = caller_site()
            if site is not None:
                sync = self.mode.record.syncs.setdefault(site, SyncStats(site))
                sync.kinds["cuda-sync"] += 1
                sync.steps_seen.add(self.mode.step)

        warnings.showwarning = show  # type: ignore[assignment]
        torch.cuda.set_sync_debug_mode("warn")

    def stop(self) -> None:
        if self._saved is None:
            return
        debug_mode, show = self._saved
        self._saved = None
        torch.cuda.set_sync_debug_mode(debug_mode)
        warnings.showwarning = show
