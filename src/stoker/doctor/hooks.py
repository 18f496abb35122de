"""Where the doctor listens: patches and global hooks, each removable, none forcing a sync.

Always on while attached (cost: a Python call and a flag test, per batch or per step):
- the DataLoader iterator's ``__next__`` (time waiting for data), and ``DataLoader.__init__`` /
  ``__iter__`` (where the loader was made, its workers and ``pin_memory``);
- ``Optimizer.__init__`` (where), ``Optimizer.zero_grad`` / ``Module.zero_grad`` (``set_to_none``;
  with ``auto_step``, ``Module.zero_grad`` marks the steps of a loop that updates its weights by
  hand until an optimizer step is seen);
- ``torch.compile`` and ``torch.set_num_threads`` (where they were called);
- torch's global optimizer step pre/post hooks (optimizer time; with ``auto_step`` the steps).

On only inside the profiled window: global module forward pre/post hooks (forward time, the
model and one input batch for the probes, forwards run in eval mode with grad enabled) and a
wrapper of ``torch.autograd.backward`` (backward time).
"""

from __future__ import annotations

import contextlib
import functools
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch.nn.modules import module as _module
from torch.optim import optimizer as _optimizer
from torch.utils.data import DataLoader
from torch.utils.data import dataloader as _dataloader

from stoker.doctor.frames import Site, caller_site

if TYPE_CHECKING:
    from stoker.doctor.session import Doctor

__all__ = ["install", "install_window", "site_of"]

_SITE_ATTR = "_stoker_doctor_site"


def site_of(obj: object) -> Site | None:
    """The user line that created ``obj`` (a DataLoader or Optimizer), when the doctor saw it."""
    return getattr(obj, _SITE_ATTR, None)


class _Patches:
    """Attribute replacements and hook handles, undone in reverse order."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def setattr(self, owner: Any, name: str, value: Any) -> None:
        old = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        setattr(owner, name, value)
        self._undo.append(lambda: setattr(owner, name, old))

    def handle(self, handle: Any) -> None:
        self._undo.append(handle.remove)

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()


def _guarded(doctor: Doctor, fn: Callable[..., None]) -> Callable[..., None]:
    """Run a bookkeeping callback; a failure disables the doctor instead of breaking the step."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        # Inside a torch.compile trace (a forward hook of a compiled module) do nothing: dynamo
        # traces this branch as a constant, so the hook adds no graph break and no guard.
        if torch.compiler.is_compiling() or doctor.failed is not None:
            return
        try:
            fn(*args, **kwargs)
        except doctor.stop_exception:
            raise
        except Exception as exc:
            doctor.fail(exc)

    return wrapper


def install(doctor: Doctor) -> Callable[[], None]:
    """Install the always-on listeners for ``doctor``; returns the function that removes them."""
    patches = _Patches()
    record = _guarded

    # --- data: time inside the loader iterator's __next__ --------------------------------
    orig_next = _dataloader._BaseDataLoaderIter.__next__

    @functools.wraps(orig_next)
    def timed_next(it: Any) -> Any:
        mode = doctor.attribution_mode
        if mode is not None:  # the attribution steps: the loader's own calls are not a line's
            mode.loading += 1
            try:
                return orig_next(it)
            finally:
                mode.loading -= 1
        if not doctor.in_window:
            return orig_next(it)
        start = time.perf_counter()
        batch = orig_next(it)
        record(doctor, doctor.on_data_wait)(it, time.perf_counter() - start, batch)
        return batch

    patches.setattr(_dataloader._BaseDataLoaderIter, "__next__", timed_next)

    orig_loader_init = DataLoader.__init__

    @functools.wraps(orig_loader_init)
    def loader_init(loader: Any, *args: Any, **kwargs: Any) -> None:
        orig_loader_init(loader, *args, **kwargs)
        loader.__dict__[_SITE_ATTR] = caller_site()

    patches.setattr(DataLoader, "__init__", loader_init)

    orig_loader_iter = DataLoader.__iter__

    @functools.wraps(orig_loader_iter)
    def loader_iter(loader: Any) -> Any:
        it = orig_loader_iter(loader)
        with contextlib.suppress(AttributeError, TypeError):  # an iterator with __slots__
            it.__dict__["_stoker_doctor_loader"] = weakref.ref(loader)
        return it

    patches.setattr(DataLoader, "__iter__", loader_iter)

    # --- optimizers: where made, how grads are zeroed, step boundaries -----------------------
    orig_opt_init = _optimizer.Optimizer.__init__

    @functools.wraps(orig_opt_init)
    def opt_init(opt: Any, *args: Any, **kwargs: Any) -> None:
        orig_opt_init(opt, *args, **kwargs)
        if _SITE_ATTR not in opt.__dict__:
            opt.__dict__[_SITE_ATTR] = caller_site()

    patches.setattr(_optimizer.Optimizer, "__init__", opt_init)

    for owner in (_optimizer.Optimizer, torch.nn.Module):
        orig_zero = owner.__dict__["zero_grad"]

        def zero_grad(obj: Any, set_to_none: bool = True, _orig: Any = orig_zero) -> None:
            if isinstance(obj, torch.nn.Module):  # a step of a loop without torch.optim?
                record(doctor, doctor.on_module_zero_grad)()
            if not doctor.in_window:
                return _orig(obj, set_to_none)
            start = time.perf_counter()
            _orig(obj, set_to_none)
            record(doctor, doctor.on_zero_grad)(
                obj, set_to_none, caller_site(), time.perf_counter() - start
            )

        functools.update_wrapper(zero_grad, orig_zero)
        patches.setattr(owner, "zero_grad", zero_grad)

    # Optimizer time and identity always; they also count steps when ``auto_step``.
    patches.handle(
        _optimizer.register_optimizer_step_pre_hook(record(doctor, doctor.on_optimizer_pre))
    )
    patches.handle(
        _optimizer.register_optimizer_step_post_hook(record(doctor, doctor.on_optimizer_post))
    )

    # --- where torch.compile and torch.set_num_threads were called ---------------------------
    orig_compile = torch.compile

    @functools.wraps(orig_compile)
    def compile_(*args: Any, **kwargs: Any) -> Any:
        doctor.compile_sites.append(caller_site())
        return orig_compile(*args, **kwargs)

    patches.setattr(torch, "compile", compile_)

    orig_threads = torch.set_num_threads

    @functools.wraps(orig_threads)
    def set_num_threads(n: int) -> None:
        doctor.thread_sites.append((caller_site(), int(n)))
        orig_threads(n)

    patches.setattr(torch, "set_num_threads", set_num_threads)
    return patches.undo


def install_window(doctor: Doctor) -> Callable[[], None]:
    """Install the window-only listeners (forward and backward timing)."""
    patches = _Patches()
    depth = [0]
    starts: list[float] = []

    def pre(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        depth[0] += 1
        if depth[0] == 1:
            starts.append(time.perf_counter())
            doctor.on_forward_start(module, args)

    def post(
        module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        depth[0] -= 1
        if depth[0] == 0 and starts:
            doctor.on_forward_end(module, kwargs, time.perf_counter() - starts.pop())

    patches.handle(_module.register_module_forward_pre_hook(_guarded(doctor, pre)))
    patches.handle(
        _module.register_module_forward_hook(
            _guarded(doctor, post), with_kwargs=True, always_call=True
        )
    )

    orig_backward = torch.autograd.backward

    @functools.wraps(orig_backward)
    def backward(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return orig_backward(*args, **kwargs)
        finally:
            _guarded(doctor, doctor.on_backward)(time.perf_counter() - start)

    patches.setattr(torch.autograd, "backward", backward)
    return patches.undo
