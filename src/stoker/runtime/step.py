"""The training step's one owner: micro-batches, accumulation, token counts, the grad scaler,
gradient finalization and the step boundary, with listeners at its boundaries.

One optimizer step, as :class:`TrainingStep` sees it (``k`` = ``accumulation_steps``)::

    for each of k micro-batches:
        start_micro_batch()     # a loader's fetch, accumulate() or backward(): listeners'
                                # on_micro_batch, once per step (a due checkpoint is written)
        backward(loss, tokens)  # loss * tokens (or loss / k), scaled under fp16
    finalize_gradients()        # once per step: unscale (fp16), divide by the global tokens
    optimizer_step(opt)         # per prepared optimizer; the step ends when all have stepped
    -> step += 1, scaler.update() once, listeners' on_step_end(step)

Everything here runs every step, so it keeps to attribute reads and integer arithmetic: no
host-device sync (token counts stay on the device; fp16's ``GradScaler.step`` reading its inf
flag is torch's), no allocation, no generator. Listeners say from which step they next need a
call, so a step where none has anything to do calls none (on a model whose step takes ~150 µs,
each Python call on the step's path is a measurable share of it). A step with no listener due
and nothing to scale, accumulate or finalize is *quiet*: ``backward`` and ``optimizer_step``
then take a short path that only steps and counts (see :meth:`TrainingStep._end_step`).

A step ends when every prepared optimizer has stepped (two optimizers, one iteration: one
step, one ``GradScaler.update()``, each optimizer's gradients unscaled once). A loop that steps
only some of them in an iteration (a GAN's alternating updates) ends the step at the start of
the next micro-batch, or at :meth:`TrainingStep.settle` (a checkpoint, the end of the run).
"""

from __future__ import annotations

import logging
import sys
import time
import types
import weakref
from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from stoker.errors import StokerError
from stoker.runtime.distributed import DistributedContext
from stoker.runtime.model import PreparedModel

__all__ = ["Alarm", "MicroBatch", "StepListener", "StepLog", "TrainingStep"]

log = logging.getLogger(__name__)

_MIXED_TOKENS = (
    "backward() was called both with and without tokens= in one accumulation window; pass "
    "tokens= on every micro-batch or on none"
)


class StepListener(Protocol):
    """What attaches at step boundaries: checkpoints, the doctor, the run record, the ranks'
    final barrier, the meters, preemption.

    Why these three calls and no more:

    - ``on_step_end(step)``: right after optimizer step ``step`` (counted from 1), before the
      loop moves on. The one place where "as of the step" state exists: what a checkpoint of
      this step must hold is copied here, and the doctor counts its window here.
    - ``on_micro_batch(step, live)``: the loop starts on the next micro-batch after the step
      ended (and once at the start of the run, with ``step`` 0): the user's
      ``scheduler.step()`` has run, so this is where a due checkpoint is written. Called once
      per step, at the first of a prepared loader's fetch (``live``: nothing moved since the
      step, the live state may be written), ``accumulate()`` and ``backward()`` (``live``
      False: the loop drew data and ran a forward since).
    - ``close(failed)``: the run ends; ``failed`` is the exception ending it, or None.
      Listeners close in reverse order of attachment (the last attached first, like a stack
      of context managers), and a listener that raises hands its error on to those after it
      as ``failed``; the first error is raised once all have closed.

    ``on_micro_batch`` and ``on_step_end`` return the step from which the listener next needs
    to hear (None: the next boundary); until then :class:`TrainingStep` calls neither, unless
    its :class:`Alarm` rings (a signal came). Returning the current step asks for the next
    boundary of the same step: ``on_step_end(n)`` returning ``n`` gets ``on_micro_batch(n)``.

    Each runs on every rank, on the training thread. The methods here do nothing: a listener
    implements only the calls it needs, and :class:`TrainingStep` never calls one it left out.
    """

    def on_micro_batch(self, step: int, live: bool) -> int | None:
        return None

    def on_step_end(self, step: int) -> int | None:
        return None

    def close(self, failed: BaseException | None) -> None:
        return None


class Alarm:
    """Rung from outside the loop (a signal handler) to have every listener called at the next
    boundary, whatever step it asked for. It holds its step only weakly, so a signal handler
    keeping a reference to it keeps no run alive."""

    __slots__ = ("_steps", "rung")

    def __init__(self, steps: TrainingStep | None = None) -> None:
        self.rung = False
        self._steps = weakref.ref(steps) if steps is not None else None

    def ring(self) -> None:
        """Have every listener called at the next boundary (safe in a signal handler)."""
        self.rung = True
        steps = self._steps() if self._steps is not None else None
        if steps is not None:
            steps._quiet = False  # the next step takes the full path, which sees the alarm


class StepLog:
    """Each step's end (``time.perf_counter()``) and token count (``backward``'s ``tokens=``,
    summed over the step, on the device) since a reader last took them. The step keeps it
    when a reader (the meters) sets :attr:`TrainingStep.step_log`: an append per step, where a
    listener would cost a call per step."""

    __slots__ = ("ends", "tokens")

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.tokens: list[torch.Tensor] = []

    def take(self) -> tuple[list[float], list[torch.Tensor]]:
        """The steps logged so far; the log starts over."""
        ends, tokens = self.ends, self.tokens
        self.ends, self.tokens = [], []
        return ends, tokens


class TrainingStep:
    """The state of the training step and the operations the prepared objects call.

    Args:
        accumulation_steps: micro-batches per optimizer step under :meth:`Stoker.accumulate`.
        scaler: the fp16 grad scaler, or None.
        dist: where this process is (for the global token count).
    """

    def __init__(
        self,
        *,
        accumulation_steps: int,
        scaler: torch.amp.GradScaler | None,
        dist: DistributedContext,
    ) -> None:
        self.accumulation_steps = accumulation_steps
        self.scaler = scaler
        self.dist = dist
        self.step = 0
        """Optimizer steps taken."""
        self.micro_step = 0
        """Micro-batches entered under :meth:`Stoker.accumulate`."""
        self.skipped_steps = 0
        """fp16 steps the grad scaler skipped (non-finite gradients)."""
        self.sync_gradients = True
        """Whether this micro-batch completes the gradients (the last of its window)."""
        self.params: list[nn.Parameter] = []
        self.optimizers: list[torch.optim.Optimizer] = []
        self.ddp_models: list[DistributedDataParallel] = []
        self.fsdp_models: list[Any] = []  # FSDPModule roots
        self.sharded = False
        """Whether the gradients are DTensor shards (FSDP)."""
        self._fsdp_sync = True  # what the FSDP models were last told by accumulate()
        self.micro_batch = MicroBatch(self)
        self._tokens: torch.Tensor | None = None  # this window's token count, on the device
        self.last_tokens: torch.Tensor | None = None
        """The token count of the step that ended last (``backward``'s ``tokens=``, summed
        over its micro-batches and, under DDP, over ranks), on the device; for the meters."""
        self._plain_backward = False  # a backward() without tokens= in this window
        self._finalized = False
        self._stepped = 0  # prepared optimizers stepped in the step that has not ended yet
        self._scale_before = 0.0
        self._boundary = True  # a step ended (or the run began); no micro-batch started since
        self.before_optimizer: Callable[[], None] | None = None
        """Called once the gradients are complete, before the optimizer steps (the meters
        stop counting a step's FLOPs here: model FLOPs are the forward's and backward's)."""
        self.step_log: StepLog | None = None
        """Where each step's end and token count are appended, when a reader wants them."""
        self.alarm = Alarm(self)
        """Ring it to have every listener called at the next boundary (see :class:`Alarm`)."""
        self._listeners: list[StepListener] = []
        # (listener index, call): the calls each listener implements.
        self._on_micro_batch: tuple[tuple[int, Callable[..., int | None]], ...] = ()
        self._on_step_end: tuple[tuple[int, Callable[..., int | None]], ...] = ()
        self._wanted: list[int] = []  # per listener: the step from which it needs a call
        self._wake = 0  # the smallest of those: before it, no boundary calls anyone
        self._quiet = False  # the next step has nothing to do but step (see _end_step)

    # -- what the step covers ---------------------------------------------------------------
    def add_model(
        self, model: nn.Module, ddp: DistributedDataParallel | None, *, sharded: bool = False
    ) -> None:
        self.params.extend(p for p in model.parameters() if p.requires_grad)
        if ddp is not None:
            self.ddp_models.append(ddp)
        if sharded:
            self.fsdp_models.append(model)
            self.sharded = True

    def gradient_sync(self, sync: bool) -> None:
        """Tell the FSDP models whether this micro-batch reduce-scatters its gradients (the
        window's last) or keeps accumulating them unsharded; only when that changes."""
        if sync != self._fsdp_sync:
            self._fsdp_sync = sync
            for model in self.fsdp_models:
                model.set_requires_gradient_sync(sync)

    def add_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizers.append(optimizer)
        self._quiet = False  # a step now ends once every optimizer has stepped

    def add_listener(self, listener: StepListener) -> None:
        """Attach ``listener`` (see :class:`StepListener`); only the calls it implements are
        made."""
        index = len(self._listeners)
        self._listeners.append(listener)
        kind = type(listener)
        calls = False
        if kind.on_micro_batch is not StepListener.on_micro_batch:
            self._on_micro_batch += ((index, listener.on_micro_batch),)
            calls = True
        if kind.on_step_end is not StepListener.on_step_end:
            self._on_step_end += ((index, listener.on_step_end),)
            calls = True
        self._wanted.append(0 if calls else sys.maxsize)  # (one that only closes: never)
        self._wake = min(self._wanted)
        self._quiet = False

    def _call(self, calls: tuple[tuple[int, Callable[..., int | None]], ...], *args: Any) -> None:
        """Make ``calls`` whose listeners asked for this step (all of them if the alarm rang)
        and keep when each wants the next one."""
        alarm = self.alarm
        rung, alarm.rung = alarm.rung, False
        step = args[0]
        wanted = self._wanted
        for index, call in calls:
            if rung or step >= wanted[index]:
                after = call(*args)
                wanted[index] = step if after is None else after
        self._wake = min(wanted, default=sys.maxsize)

    # -- micro-batches --------------------------------------------------------------------
    def start_micro_batch(self, live: bool = False) -> None:
        """The loop starts on a micro-batch (see :class:`StepListener` for ``live``)."""
        if self._stepped:  # some optimizers stepped, not all: the step ends here
            self._end_step()
        if self._boundary:
            self._boundary = False
            if self.step >= self._wake or self.alarm.rung:
                self._call(self._on_micro_batch, self.step, live)

    def enter_accumulation(self) -> bool:
        """Count a micro-batch of an accumulation window; True when it is the window's last."""
        if self._stepped or self._boundary:
            self.start_micro_batch()
        self.micro_step += 1
        sync = self.sync_gradients = self.micro_step % self.accumulation_steps == 0
        return sync

    def backward(self, loss: torch.Tensor, *, tokens: torch.Tensor | int | None = None) -> None:
        """See :meth:`Stoker.backward`."""
        if self._quiet and tokens is None:  # nothing to scale or call (see _end_step)
            self._boundary = False
            self._plain_backward = True
            loss.backward()
            return
        self._quiet = False  # (tokens=: the optimizer step must normalise them)
        if self._stepped:  # (start_micro_batch, inlined: this runs every micro-batch)
            self._end_step()
        if self._boundary:
            self._boundary = False
            if self.step >= self._wake or self.alarm.rung:
                self._call(self._on_micro_batch, self.step, False)
        self._finalized = False
        if tokens is None:
            if self._tokens is not None:
                raise StokerError(_MIXED_TOKENS)
            self._plain_backward = True
            k = self.accumulation_steps
            scaled = loss / k if k > 1 else loss
        else:
            if self._plain_backward:
                raise StokerError(_MIXED_TOKENS)
            if not isinstance(tokens, torch.Tensor):
                tokens = torch.tensor(tokens, device=loss.device)
            count = tokens.detach().to(torch.float32)
            self._tokens = count if self._tokens is None else self._tokens + count
            scaled = loss * count
        if self.scaler is not None:
            scaled = self.scaler.scale(scaled)
        scaled.backward()

    # -- the step -------------------------------------------------------------------------
    def finalize_gradients(self) -> None:
        """Unscale (fp16) and token-normalise the window's gradients; once per step."""
        if self._finalized:
            return
        self._finalized = True
        if self.scaler is not None:
            for optimizer in self.optimizers:
                self.scaler.unscale_(optimizer)
        if self._tokens is not None:
            total = self._tokens
            if self.dist.enabled:
                dist.all_reduce(total)
            # DDP averaged the summed-loss gradients over ranks; undo that and divide by the
            # global token count: grad = sum_ranks(g) / total = mean_ranks(g) * W / total.
            scale = self.dist.world_size / total.clamp_min(1.0)
            grads = [p.grad for p in self.params if p.grad is not None]
            if self.sharded:  # FSDP averaged too; scale each process's own shard in place
                grads = [g.to_local() for g in grads]  # type: ignore[attr-defined]
            if grads:
                torch._foreach_mul_(grads, scale)

    def clip_grad_norm_(self, max_norm: float, norm_type: float) -> torch.Tensor | None:
        """See :meth:`Stoker.clip_grad_norm_`."""
        if not self.sync_gradients:
            return None
        self.finalize_gradients()
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm, norm_type, foreach=True)
        # Over DTensor shards the norm is a DTensor (already the global one): hand back a
        # plain tensor, as without sharding.
        return norm.full_tensor() if self.sharded else norm  # type: ignore[attr-defined]

    def optimizer_step(
        self, optimizer: torch.optim.Optimizer, closure: Callable[[], float] | None = None
    ) -> Any:
        """Step ``optimizer`` if the gradients are complete (the last micro-batch of a window);
        the step ends once every prepared optimizer has stepped."""
        if self._quiet:  # nothing to finalize or call: step, count, log (see _end_step)
            result = optimizer.step() if closure is None else optimizer.step(closure)
            self.step += 1
            self.last_tokens = None
            self._plain_backward = False
            self._finalized = False
            self._boundary = True
            step_log = self.step_log
            if step_log is not None:
                step_log.ends.append(time.perf_counter())
            if self.step + 1 >= self._wake:  # a listener is due in the next step
                self._quiet = False
            return result
        if not self.sync_gradients:
            return None
        if self.before_optimizer is not None:
            self.before_optimizer()
        scaler = self.scaler
        if scaler is not None:
            self.finalize_gradients()
            if not self._stepped:
                self._scale_before = scaler.get_scale()
            result = scaler.step(optimizer)  # skips optimizer.step() on inf/nan gradients
        else:
            if self._tokens is not None:  # token-weighted window: normalise the gradients
                self.finalize_gradients()
            result = optimizer.step(closure) if closure is not None else optimizer.step()
        self._stepped += 1
        if self._stepped >= len(self.optimizers):
            self._end_step()
        return result

    def step_done(self) -> None:
        """See :meth:`Stoker.step_done`."""
        if self.sync_gradients:
            self._end_step()

    def settle(self) -> None:
        """End a step some optimizers took and others did not (before a checkpoint or the end
        of the run)."""
        if self._stepped:
            self._end_step()

    def _end_step(self) -> None:
        if self.scaler is not None and self._stepped:
            self._update_scaler()
        self._stepped = 0
        self.step += 1
        tokens = self.last_tokens = self._tokens
        self._tokens = None
        self._plain_backward = False
        self._finalized = False
        self._boundary = True
        step_log = self.step_log
        if step_log is not None:
            step_log.ends.append(time.perf_counter())
            if tokens is not None:
                step_log.tokens.append(tokens)
        if self.step >= self._wake or self.alarm.rung:
            self._call(self._on_step_end, self.step)
        # Whether the next step is quiet: no listener due at its micro-batch (step) or its end
        # (step + 1), nothing to scale, accumulate or finalize, one optimizer. Then backward()
        # and optimizer_step() take a short path (~1,700 fewer instructions a step than the
        # full one: benchmarks/step_instructions.py); tokens=, a rung alarm (Alarm.ring), a
        # due listener or another optimizer end it.
        self._quiet = (
            self.step + 1 < self._wake
            and self.scaler is None
            and self.accumulation_steps == 1
            and len(self.optimizers) == 1
            and self.before_optimizer is None
        )
        if self.alarm.rung:  # (a signal after the read above: ring() may have run already)
            self._quiet = False

    def _update_scaler(self) -> None:
        scaler = self.scaler
        assert scaler is not None
        scaler.update()
        if scaler.get_scale() < self._scale_before:
            # GradScaler found inf/nan gradients and skipped optimizer.step(): say so.
            self.skipped_steps += 1
            log.warning(
                "fp16 step %d skipped: non-finite gradients, loss scale lowered to %g",
                self.step,
                scaler.get_scale(),
            )

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The counters and the grad scaler, as of the step that ended last."""
        state: dict[str, Any] = {
            "step": self.step,
            "micro_step": self.micro_step,
            "skipped_steps": self.skipped_steps,
        }
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any], *, new_window: bool = False) -> None:
        """Continue from ``state``; ``new_window``: ``accumulation_steps`` changed since it was
        saved, so the next accumulation window starts at the restored step."""
        self.step = int(state["step"])
        self._quiet = False
        self.micro_step = int(state["micro_step"])
        self.skipped_steps = int(state["skipped_steps"])
        if new_window:
            self.micro_step = self.step * self.accumulation_steps
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    def close(self, failed: BaseException | None) -> None:
        """Close the listeners, last attached first (see :class:`StepListener`)."""
        self.settle()
        error: BaseException | None = None
        for listener in reversed(self._listeners):
            try:
                listener.close(failed)
            except BaseException as exc:
                if error is None:
                    error = exc
                if failed is None:
                    failed = exc
        if error is not None:
            raise error


class MicroBatch:
    """The context :meth:`Stoker.accumulate` returns; one reused object, no allocation.

    A class rather than a ``@contextmanager`` generator: this runs every step, and the
    generator machinery measured ~4 µs per step inside a real training step.
    """

    __slots__ = ("model", "no_sync", "steps")

    def __init__(self, steps: TrainingStep) -> None:
        self.steps = steps
        self.model: nn.Module | None = None
        self.no_sync: Any = None

    def __enter__(self) -> None:
        steps = self.steps
        sync = steps.enter_accumulation()
        if steps.fsdp_models:
            steps.gradient_sync(sync)
            return
        if sync or not steps.ddp_models:
            return
        # Skip DDP's all-reduce on all but the window's last micro-batch.
        model = self.model
        ddp = model.ddp if isinstance(model, PreparedModel) else None
        if ddp is None and isinstance(model, DistributedDataParallel):
            ddp = model
        self.no_sync = (ddp or steps.ddp_models[0]).no_sync()
        self.no_sync.__enter__()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        if self.no_sync is not None:
            no_sync, self.no_sync = self.no_sync, None
            no_sync.__exit__(exc_type, exc, tb)
