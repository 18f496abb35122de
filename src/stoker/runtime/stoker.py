"""``Stoker``: the thin layer that makes one training loop run anywhere, fast.

A plain loop becomes a stoker loop by creating a :class:`Stoker`, passing model, optimizer and
loaders through :meth:`Stoker.prepare` and calling :meth:`Stoker.backward` instead of
``loss.backward()``. Nothing else moves: the user keeps the loop.

Nothing on the per-step path forces a host-device sync: token counts for accumulation stay on
the device, gradient clipping uses the foreach kernels without reading the norm, and the step
counter is a Python int. (fp16 is the one exception, and it is torch's: ``GradScaler.step`` must
read the inf flag on the host to decide whether to step; bf16 needs no scaler.)
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import shutil
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from stoker.errors import StokerError, install_excepthook
from stoker.runtime.device import resolve_device
from stoker.runtime.distributed import DistributedContext, init_distributed, shard_loader
from stoker.runtime.precision import PrecisionPolicy, resolve_precision

__all__ = ["PreparedLoader", "PreparedOptimizer", "PreparedScheduler", "Stoker"]

log = logging.getLogger(__name__)

_HALF = (torch.bfloat16, torch.float16)


def _to_fp32(output: Any) -> Any:
    """Cast half-precision floating tensors in a (nested) model output back to fp32."""
    if isinstance(output, torch.Tensor):
        return output.float() if output.dtype in _HALF else output
    if isinstance(output, tuple) and hasattr(output, "_fields"):  # namedtuple
        return type(output)(*(_to_fp32(o) for o in output))
    if isinstance(output, list | tuple):
        return type(output)(_to_fp32(o) for o in output)
    if isinstance(output, dict):
        return {k: _to_fp32(v) for k, v in output.items()}
    return output


def _autocast_forward(forward: Callable[..., Any], device_type: str, dtype: torch.dtype) -> Any:
    @functools.wraps(forward)
    def forward_in_autocast(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device_type=device_type, dtype=dtype):
            output = forward(*args, **kwargs)
        # Losses computed outside the model (cross-entropy on bf16 logits) lose precision;
        # hand fp32 back like a fp32 model would.
        return _to_fp32(output)

    forward_in_autocast._stoker_autocast = True  # type: ignore[attr-defined]
    return forward_in_autocast


def _move(batch: Any, device: torch.device, non_blocking: bool) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {k: _move(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_move(b, device, non_blocking) for b in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(_move(b, device, non_blocking) for b in batch)
    return batch


def _have_cxx_compiler() -> bool:
    return bool(os.environ.get("CXX") or any(shutil.which(c) for c in ("g++", "c++", "clang++")))


def _check_compile(device: torch.device) -> None:
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        raise StokerError(
            "compile=True but torch.compile is not supported on this Python/torch "
            f"(torch {torch.__version__}); pass compile=False"
        )
    if device.type == "cpu" and not _have_cxx_compiler():
        raise StokerError(
            "compile=True on CPU needs a C++ compiler for the inductor backend and none was found "
            "(g++, c++, clang++ or $CXX); install one (e.g. `apt-get install g++`) or pass "
            "compile=False"
        )
    if device.type == "mps":
        raise StokerError("compile=True is not supported on MPS by stoker yet; pass compile=False")


class PreparedOptimizer(torch.optim.Optimizer):
    """The user's optimizer, stepping only when gradients are complete.

    Under :meth:`Stoker.accumulate`, ``step()`` and ``zero_grad()`` are no-ops on non-final
    micro-batches, so the loop body stays the same with or without accumulation. Subclasses
    ``Optimizer`` (without calling its ``__init__``) so LR schedulers accept it.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, stoker: Stoker) -> None:
        self.optimizer = optimizer
        self._stoker = stoker

    # The state lives in the wrapped optimizer; these keep schedulers and user code working.
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    def step(self, closure: Callable[[], float] | None = None) -> Any:
        stoker = self._stoker
        if not stoker.sync_gradients:
            return None
        stoker._finalize_gradients()
        if stoker._scaler is not None:
            result = stoker._scaler_step(self.optimizer)
        else:
            result = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        stoker._after_step()
        return result

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._stoker.sync_gradients:
            self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def __getstate__(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer}

    def __repr__(self) -> str:
        return f"PreparedOptimizer({self.optimizer!r})"


class PreparedScheduler:
    """The user's LR scheduler, stepping once per optimizer step, not per micro-batch."""

    def __init__(self, scheduler: Any, stoker: Stoker) -> None:
        self.scheduler = scheduler
        self._stoker = stoker

    def step(self, *args: Any, **kwargs: Any) -> None:
        if self._stoker.sync_gradients:
            self.scheduler.step(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.scheduler, name)


class PreparedLoader:
    """Iterates the user's loader: this rank's shard, batches on the run's device.

    Advances the sampler's epoch (``set_epoch``) at the start of every pass, as
    ``DistributedSampler`` needs for a different shuffle each epoch.
    """

    def __init__(self, loader: DataLoader[Any], device: torch.device) -> None:
        self.loader = loader
        self.device = device
        self.epoch = 0
        self._move = device.type != "cpu"
        # Pinned host memory lets the copy overlap compute; only then is non_blocking safe.
        self._non_blocking = device.type == "cuda" and bool(loader.pin_memory)

    def _set_epoch(self) -> None:
        for sampler in (self.loader.batch_sampler, self.loader.sampler):
            set_epoch = getattr(sampler, "set_epoch", None)
            if set_epoch is not None:
                set_epoch(self.epoch)

    def __iter__(self) -> Iterator[Any]:
        self._set_epoch()
        try:
            if not self._move:
                yield from self.loader
            else:
                for batch in self.loader:
                    yield _move(batch, self.device, self._non_blocking)
        finally:
            self.epoch += 1

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


class Stoker:
    """Device, precision, distributed wrapping and the backward/accumulate/clip steps.

    Args:
        device: ``"auto"`` (cuda > mps > cpu), or a device name such as ``"cpu"``, ``"cuda:1"``.
        precision: ``"fp32"``, ``"bf16"``, ``"fp16"`` (CUDA, with a grad scaler) or ``"auto"``
            (bf16 where the hardware has fast bf16 matrix products, else fp32).
        compile: wrap the model in ``torch.compile`` in :meth:`prepare`.
        accumulation_steps: micro-batches per optimizer step under :meth:`accumulate`.
        seed: if given, seeds Python, NumPy and torch identically on every rank.

    Example:
        >>> import torch
        >>> from stoker import Stoker
        >>> stoker = Stoker(device="cpu", precision="fp32")
        >>> model = torch.nn.Linear(4, 2)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> model, optimizer = stoker.prepare(model, optimizer)
        >>> loss = model(torch.randn(8, 4)).square().mean()
        >>> stoker.backward(loss)
        >>> optimizer.step(); optimizer.zero_grad()
        >>> stoker.step
        1
    """

    def __init__(
        self,
        *,
        device: str | torch.device = "auto",
        precision: str = "auto",
        compile: bool = False,
        accumulation_steps: int = 1,
        seed: int | None = None,
    ) -> None:
        install_excepthook()
        if not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise StokerError(
                f"accumulation_steps={accumulation_steps!r} must be a positive integer"
            )
        if not isinstance(compile, bool):
            raise StokerError(f"compile={compile!r} must be True or False")
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.policy = PrecisionPolicy(self.precision, self.device.type)
        if compile:
            _check_compile(self.device)
        self.compile = compile
        self.accumulation_steps = accumulation_steps
        self.seed = seed
        if seed is not None:
            self.seed_everything(seed)
        self.dist: DistributedContext = init_distributed(self.device)
        self.step = 0
        self.skipped_steps = 0
        self._micro_step = 0
        self.sync_gradients = True
        self._params: list[nn.Parameter] = []
        self._ddp_models: list[DistributedDataParallel] = []
        self._optimizers: list[torch.optim.Optimizer] = []
        self._tokens: torch.Tensor | None = None
        self._plain_backward = False
        self._finalized = False
        self._scaler = torch.amp.GradScaler(self.device.type) if self.policy.needs_scaler else None

    # -- where this process is -------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.dist.rank

    @property
    def local_rank(self) -> int:
        return self.dist.local_rank

    @property
    def world_size(self) -> int:
        return self.dist.world_size

    @property
    def is_main(self) -> bool:
        return self.dist.rank == 0

    @property
    def settings(self) -> dict[str, Any]:
        """What this runtime resolved to, for run records and reports."""
        return {
            "device": str(self.device),
            "precision": self.precision,
            "compile": self.compile,
            "accumulation_steps": self.accumulation_steps,
            "seed": self.seed,
            "world_size": self.world_size,
        }

    def print(self, *args: Any, **kwargs: Any) -> None:
        """``print`` on the main rank only."""
        if self.is_main:
            print(*args, **kwargs)

    @staticmethod
    def seed_everything(seed: int) -> None:
        """Seed Python's ``random``, NumPy and torch (CPU and CUDA)."""
        import numpy as np

        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    # -- prepare -------------------------------------------------------------------------
    def prepare(self, model: nn.Module, *objects: Any, scheduler: Any = None) -> Any:
        """Ready a model, its optimizer and any data loaders for this device and process group.

        ``prepare(model, optimizer, *loaders, scheduler=None)`` returns the same objects in the
        same order (the scheduler last, if given): the model on the device, wrapped in
        ``DistributedDataParallel`` when several processes run, compiled when asked, its
        forward under the precision policy's autocast; the optimizer stepping once per
        accumulation window; each loader yielding this rank's shard on the device.
        """
        if not isinstance(model, nn.Module):
            raise StokerError(
                f"prepare() takes the model first, got {type(model).__name__}; "
                "call prepare(model, optimizer, *loaders)"
            )
        prepared: list[Any] = [self._prepare_model(model)]
        for obj in objects:
            if isinstance(obj, torch.optim.Optimizer):
                self._optimizers.append(obj)
                prepared.append(PreparedOptimizer(obj, self))
            elif isinstance(obj, DataLoader):
                seed = self.seed if self.seed is not None else 0
                prepared.append(PreparedLoader(shard_loader(obj, self.dist, seed), self.device))
            else:
                raise StokerError(
                    f"prepare() does not know what to do with a {type(obj).__name__}; it takes "
                    "an nn.Module, optimizers and DataLoaders (and scheduler=...)"
                )
        if scheduler is not None:
            prepared.append(PreparedScheduler(scheduler, self))
        return prepared[0] if len(prepared) == 1 else tuple(prepared)

    def _prepare_model(self, model: nn.Module) -> nn.Module:
        model.to(self.device)
        self._params.extend(p for p in model.parameters() if p.requires_grad)
        dtype = self.policy.autocast_dtype
        if dtype is not None and not getattr(model.forward, "_stoker_autocast", False):
            model.forward = _autocast_forward(model.forward, self.device.type, dtype)
        wrapped: nn.Module = model
        if self.dist.enabled:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            ddp = DistributedDataParallel(model, device_ids=device_ids)
            self._ddp_models.append(ddp)
            wrapped = ddp
        if self.compile:
            wrapped = torch.compile(wrapped)  # type: ignore[assignment]
        return wrapped

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        """The user's own module inside any DDP or ``torch.compile`` wrappers."""
        while True:
            inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
            if not isinstance(inner, nn.Module):
                return model
            model = inner

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """The precision policy's autocast, for computation outside the prepared model."""
        return self.policy.autocast()

    # -- the step --------------------------------------------------------------------------
    @contextlib.contextmanager
    def accumulate(self, model: nn.Module) -> Iterator[None]:
        """One micro-batch of a gradient-accumulation window.

        On all but the last micro-batch of each window of ``accumulation_steps``, DDP's
        gradient all-reduce is skipped and the prepared optimizer's ``step``/``zero_grad`` do
        nothing; :attr:`sync_gradients` says which kind of micro-batch this is.
        """
        self._micro_step += 1
        self.sync_gradients = self._micro_step % self.accumulation_steps == 0
        if not self.sync_gradients and isinstance(model, DistributedDataParallel):
            with model.no_sync():
                yield
        elif not self.sync_gradients and self._ddp_models and model not in self._ddp_models:
            # A compiled DDP model: reach the DDP module under the compile wrapper.
            with self._ddp_models[0].no_sync():
                yield
        else:
            yield

    def backward(self, loss: torch.Tensor, *, tokens: torch.Tensor | int | None = None) -> None:
        """Backpropagate ``loss`` for this micro-batch.

        Without ``tokens``, the loss is divided by ``accumulation_steps`` (right when every
        micro-batch has the same size). With ``tokens`` — the number of tokens ``loss`` is a
        mean over, as a device tensor — the window's gradient becomes the mean over *all* its
        tokens on all ranks: each micro-batch contributes ``loss * tokens`` and the sum is
        divided by the global token count before clipping and stepping. The count never
        leaves the device.
        """
        self._finalized = False
        if tokens is None:
            self._plain_backward = True
            scaled = loss / self.accumulation_steps if self.accumulation_steps > 1 else loss
        else:
            if not isinstance(tokens, torch.Tensor):
                tokens = torch.tensor(tokens, device=loss.device)
            count = tokens.detach().to(torch.float32)
            self._tokens = count if self._tokens is None else self._tokens + count
            scaled = loss * count
        if self._plain_backward and self._tokens is not None:
            raise StokerError(
                "backward() was called both with and without tokens= in one accumulation "
                "window; pass tokens= on every micro-batch or on none"
            )
        if self._scaler is not None:
            scaled = self._scaler.scale(scaled)
        scaled.backward()

    def _finalize_gradients(self) -> None:
        """Unscale (fp16) and token-normalise the window's gradients; once per step."""
        if self._finalized:
            return
        self._finalized = True
        if self._scaler is not None:
            for optimizer in self._optimizers:
                self._scaler.unscale_(optimizer)
        if self._tokens is not None:
            total = self._tokens
            if self.dist.enabled:
                dist.all_reduce(total)
            # DDP averaged the summed-loss gradients over ranks; undo that and divide by the
            # global token count: grad = sum_ranks(g) / total = mean_ranks(g) * W / total.
            scale = self.world_size / total.clamp_min(1.0)
            grads = [p.grad for p in self._params if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, scale)

    def _scaler_step(self, optimizer: torch.optim.Optimizer) -> Any:
        assert self._scaler is not None
        before = self._scaler.get_scale()
        result = self._scaler.step(optimizer)
        self._scaler.update()
        if self._scaler.get_scale() < before:
            # GradScaler found inf/nan gradients and skipped optimizer.step(): say so.
            self.skipped_steps += 1
            log.warning(
                "fp16 step %d skipped: non-finite gradients, loss scale lowered to %g",
                self.step,
                self._scaler.get_scale(),
            )
        return result

    def _after_step(self) -> None:
        self.step += 1
        self._tokens = None
        self._plain_backward = False
        self._finalized = False

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor | None:
        """Clip the prepared models' gradients; returns the total norm as a device tensor.

        On non-final micro-batches of an accumulation window it does nothing and returns None.
        """
        if not self.sync_gradients:
            return None
        self._finalize_gradients()
        return torch.nn.utils.clip_grad_norm_(self._params, max_norm, norm_type, foreach=True)

    # -- collectives ----------------------------------------------------------------------
    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate ``tensor`` from every rank along dim 0 (itself with one process)."""
        if not self.dist.enabled:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts) if tensor.dim() > 0 else torch.stack(parts)

    def reduce(self, tensor: torch.Tensor, op: Literal["mean", "sum"] = "mean") -> torch.Tensor:
        """Sum or average ``tensor`` over ranks (a copy; itself with one process)."""
        if op not in ("mean", "sum"):
            raise StokerError(f"reduce(op={op!r}) is not known; use 'mean' or 'sum'")
        if not self.dist.enabled:
            return tensor
        out = tensor.detach().clone()
        dist.all_reduce(out)
        return out / self.world_size if op == "mean" else out

    def wait_for_everyone(self) -> None:
        """A barrier across ranks (no-op with one process)."""
        if self.dist.enabled:
            dist.barrier()
