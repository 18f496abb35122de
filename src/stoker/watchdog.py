"""Non-finite loss and gradient detection that never makes the training loop wait.

Peers either sync every step to look at the loss (``if not torch.isfinite(loss): ...`` stalls a
GPU pipeline every step) or abort the process. The watchdog keeps every check on the device:

- per step, the main loop only launches device ops: ``isfinite(loss)`` and the max-abs of every
  gradient (``torch._foreach_norm(grads, inf)``: inf/nan stay inf/nan, large finite values don't
  overflow as an L2 norm would) into one small bool tensor ``[1 + n_params]``;
- on CUDA that tensor is copied ``non_blocking`` into a ring of pinned host buffers and an event
  is recorded; on CPU the tensor is already final when the op returns;
- a background thread waits for the event (CUDA) and reads the flags; the main loop never calls
  ``.item()``, so a profiler shows zero added ``aten::_local_scalar_dense`` per step.

Policies: ``"stop"`` raises :class:`NonFiniteError` from the next ``optimizer.step()`` (the step
after the bad one, at most two steps later: the loop waits for the flags of step ``k - 2`` before
step ``k``, which bounds how far the host may run ahead) naming the first bad step and the first
parameter whose gradient went non-finite. ``"skip"`` leaves the weights untouched on a bad step
without a sync: the gradients are zeroed with a device-side mask and the parameters restored with
``torch.where(ok, new, saved)`` after the optimizer's update (optimizer state sees a zero gradient
for that step: Adam's moments decay once; they never see a nan).

Checkpoints: call :meth:`Watchdog.verify` (waits for pending checks) or read
:attr:`Watchdog.healthy` before writing one; a run stopped by the watchdog is never healthy.

Example (the loss turns nan at step 3; ``optimizer.step()`` raises by step 5):

>>> import torch
>>> model = torch.nn.Linear(4, 1)
>>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
>>> watchdog = Watchdog(model, optimizer, WatchdogConfig(policy="stop"))
>>> try:
...     for step in range(1, 11):
...         x = torch.full((8, 4), float("nan") if step == 3 else 1.0)
...         loss = model(x).pow(2).mean()
...         watchdog.observe(loss)      # a device op, no sync
...         loss.backward()
...         optimizer.step()            # raises NonFiniteError within 2 steps of the nan
...         optimizer.zero_grad()
... except NonFiniteError as exc:
...     print(exc.step, exc.param, step <= 5)
3 weight True
>>> watchdog.healthy
False
>>> watchdog.close()
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from stoker.errors import StokerError

__all__ = ["NonFiniteError", "Watchdog", "WatchdogConfig"]

log = logging.getLogger(__name__)

_POLICIES = ("stop", "skip")
_RING = 4  # pinned host buffers in flight on CUDA (> the 2-step lag)


class NonFiniteError(RuntimeError):
    """The loss or a gradient went non-finite; ``step`` and ``param`` say where it started."""

    def __init__(self, message: str, step: int, param: str | None) -> None:
        super().__init__(message)
        self.step = step
        self.param = param


@dataclass(kw_only=True, slots=True)
class WatchdogConfig:
    """What the watchdog watches and what it does about it."""

    policy: str = "stop"
    """``"stop"``: raise NonFiniteError within 2 steps; ``"skip"``: leave the weights untouched
    on the bad step and go on."""
    check_grads: bool = True
    """Also check every gradient (one extra read of the gradients per step)."""

    def __post_init__(self) -> None:
        if self.policy not in _POLICIES:
            raise StokerError(
                f"WatchdogConfig.policy={self.policy!r}: choose one of {', '.join(_POLICIES)}"
            )


@dataclass(slots=True)
class _Pending:
    step: int
    flags: torch.Tensor  # bool [1 + n_params] (host memory once the event has completed)
    event: Any  # torch.cuda.Event or None
    done: threading.Event


class Watchdog:
    """Watch a model's loss and gradients for nan/inf without host syncs.

    ``params``: a module (parameter names appear in reports) or an iterable of parameters.
    ``optimizer``: when given, the checks run in its step pre/post hooks (needed for
    ``policy="skip"``); otherwise call :meth:`check` after ``backward()`` yourself.
    """

    def __init__(
        self,
        params: torch.nn.Module | Iterable[torch.nn.Parameter],
        optimizer: torch.optim.Optimizer | None = None,
        config: WatchdogConfig | None = None,
        *,
        start_step: int = 0,
    ) -> None:
        self.config = config or WatchdogConfig()
        if isinstance(params, torch.nn.Module):
            named = [(n, p) for n, p in params.named_parameters() if p.requires_grad]
        else:
            named = [(f"param[{i}]", p) for i, p in enumerate(params) if p.requires_grad]
        if not named:
            raise StokerError("Watchdog got no parameters that require grad; pass the model")
        if self.config.policy == "skip" and optimizer is None:
            raise StokerError(
                "Watchdog(policy='skip') needs the optimizer, to restore weights after its update;"
                " pass Watchdog(model, optimizer, ...)"
            )
        self._names = [n for n, _ in named]
        self._params = [p for _, p in named]
        self.step = start_step
        self.skipped: list[int] = []
        self._loss_ok: torch.Tensor | None = None
        self._ok: torch.Tensor | None = None
        self._saved: list[torch.Tensor] | None = None
        self._pending: dict[int, _Pending] = {}
        self._bad: tuple[int, str | None, bool] | None = None  # (step, param, loss_finite)
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._ring: list[torch.Tensor] = []
        self._handles: list[Any] = []
        if optimizer is not None:
            self._handles.append(optimizer.register_step_pre_hook(self._pre_hook))
            self._handles.append(optimizer.register_step_post_hook(self._post_hook))

    # ------------------------------------------------------------------ main-loop side
    def observe(self, loss: torch.Tensor) -> None:
        """Record this step's loss (a device op; no sync). Call before or after backward."""
        self._loss_ok = torch.isfinite(loss.detach()).all()

    def check(self, loss: torch.Tensor | None = None) -> None:
        """Check this step (after ``backward()``, before ``optimizer.step()``) without a sync.

        With an optimizer attached this runs from its step hook; call it yourself otherwise.
        Raises NonFiniteError (policy ``"stop"``) when an earlier step went bad.
        """
        if loss is not None:
            self.observe(loss)
        self.step += 1
        self._raise_if_bad(wait_for=self.step - 2)
        flags = self._flags()
        self._ok = flags.all()
        self._submit(flags)

    @property
    def healthy(self) -> bool:
        """False once a non-finite value reached the weights (policy ``"stop"``). Non-blocking:
        the last step or two may still be in flight; :meth:`verify` waits for them."""
        return self._bad is None or self.config.policy == "skip"

    def verify(self) -> bool:
        """Wait for every pending check, then return :attr:`healthy` (call before a checkpoint)."""
        for pending in list(self._pending.values()):
            pending.done.wait()
        return self.healthy

    def ensure_healthy(self) -> None:
        """Raise NonFiniteError when the weights are not safe to checkpoint."""
        if not self.verify():
            raise self._error()

    def close(self) -> None:
        """Remove the optimizer hooks and stop the background thread."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Watchdog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _flags(self) -> torch.Tensor:
        device = self._params[0].device
        loss_ok = (
            self._loss_ok
            if self._loss_ok is not None
            else torch.ones((), dtype=torch.bool, device=device)
        )
        self._loss_ok = None
        parts = [loss_ok.reshape(1).to(device)]
        if self.config.check_grads:
            grads = [p.grad for p in self._params]
            present = [g for g in grads if g is not None]
            if present:
                # max |g| per tensor: inf/nan propagate, finite values never overflow.
                norms = iter(torch._foreach_norm(present, float("inf")))
                zero = torch.zeros((), device=device)  # a parameter without a grad is fine
                parts.append(
                    torch.stack(
                        [next(norms).float() if g is not None else zero for g in grads]
                    ).isfinite()
                )
        return torch.cat(parts)

    def _submit(self, flags: torch.Tensor) -> None:
        event = None
        if flags.device.type == "cuda":
            if not self._ring:
                self._ring = [
                    torch.empty(flags.shape, dtype=torch.bool, pin_memory=True)
                    for _ in range(_RING)
                ]
            host = self._ring[self.step % _RING]
            host.copy_(flags, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            flags = host
        pending = _Pending(self.step, flags, event, threading.Event())
        self._pending[self.step] = pending
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._worker, name="stoker-watchdog", daemon=True
            )
            self._thread.start()
        self._queue.put(pending)

    def _worker(self) -> None:
        while True:
            pending = self._queue.get()
            if pending is None:
                return
            try:
                if pending.event is not None:
                    pending.event.synchronize()  # this thread waits, not the training loop
                flags = pending.flags.numpy()  # host memory: no dispatcher op, no sync
                if not flags.all() and self._bad is None:
                    bad_grads = [i for i, ok in enumerate(flags[1:]) if not ok]
                    param = self._names[bad_grads[0]] if bad_grads else None
                    self._bad = (pending.step, param, bool(flags[0]))
                if not flags.all() and self.config.policy == "skip":
                    self.skipped.append(pending.step)
            except Exception as exc:  # never kill the loop from the checker thread
                log.warning("stoker watchdog check of step %d failed: %r", pending.step, exc)
            finally:
                pending.done.set()

    def _raise_if_bad(self, wait_for: int) -> None:
        # Retire finished checks; wait only for the one `lag` steps old (bounded run-ahead).
        for step in sorted(self._pending):
            pending = self._pending[step]
            if step <= wait_for:
                pending.done.wait()
            if pending.done.is_set():
                del self._pending[step]
        if self._bad is not None and self.config.policy == "stop":
            raise self._error()

    def _error(self) -> NonFiniteError:
        assert self._bad is not None
        step, param, loss_ok = self._bad
        what = "gradient" if loss_ok else "loss"
        grad = f"; first non-finite gradient: {param!r}" if param else ""
        return NonFiniteError(
            f"non-finite {what} at step {step}{grad}; the weights after that step are not safe "
            "to save — lower the learning rate, clip gradients, check the data of that step, or "
            "use WatchdogConfig(policy='skip')",
            step,
            param,
        )

    def _pre_hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.check()
        if self.config.policy != "skip":
            return
        ok = self._ok
        assert ok is not None
        bad = ~ok
        # Zero the gradients on a bad step (masked_fill replaces nan, unlike a multiply).
        for p in self._params:
            if p.grad is not None:
                p.grad.masked_fill_(bad, 0.0)
        with torch.no_grad():
            if self._saved is None:
                self._saved = [p.detach().clone() for p in self._params]
            else:
                torch._foreach_copy_(self._saved, [p.detach() for p in self._params])

    def _post_hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self.config.policy != "skip" or self._saved is None or self._ok is None:
            return
        ok = self._ok
        with torch.no_grad():
            for p, saved in zip(self._params, self._saved, strict=True):
                p.copy_(torch.where(ok, p, saved))
