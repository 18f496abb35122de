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
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from stoker.errors import StokerError, install_excepthook
from stoker.runtime.boundary import StepBoundary, capture_boundary
from stoker.runtime.device import resolve_device
from stoker.runtime.distributed import (
    DistributedContext,
    barrier,
    init_distributed,
    shard_loader,
    wait_for_ranks,
)
from stoker.runtime.lifecycle import Lifecycle
from stoker.runtime.nested import map_tensors
from stoker.runtime.precision import PrecisionPolicy, resolve_precision
from stoker.runtime.prepared import (
    PreparedLoader,
    PreparedOptimizer,
    PreparedScheduler,
    _MicroBatch,
)
from stoker.runtime.same_data import SameDataCheck
from stoker.runtime.services import RESUME_CHOICES, RunServices
from stoker.runtime.tracked import TrackedState

if TYPE_CHECKING:
    from stoker.checkpoint import CheckpointConfig
    from stoker.doctor import Doctor, DoctorConfig
    from stoker.records import RecordConfig

__all__ = ["Stoker"]

log = logging.getLogger(__name__)

_HALF = (torch.bfloat16, torch.float16)


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in _HALF else t


def _to_fp32(output: Any) -> Any:
    """Cast half-precision floating tensors in a (nested) model output back to fp32, keeping
    every container's type (an HF ``ModelOutput`` stays one: ``outputs.loss`` works)."""
    if isinstance(output, torch.Tensor):
        return _fp32(output)
    return map_tensors(_fp32, output)


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


class Stoker:
    """Device, precision, distributed wrapping and the backward/accumulate/clip steps.

    Args:
        device: ``"auto"`` (cuda > mps > cpu), or a device name such as ``"cpu"``, ``"cuda:1"``.
        precision: ``"fp32"``, ``"bf16"``, ``"fp16"`` (CUDA, with a grad scaler) or ``"auto"``
            (bf16 where the hardware has fast bf16 matrix products, else fp32).
        compile: wrap the model in ``torch.compile`` in :meth:`prepare`.
        accumulation_steps: micro-batches per optimizer step under :meth:`accumulate`.
        seed: if given, seeds Python, NumPy and torch identically on every rank; also the
            base of the per-epoch data order (0 when not given).
        config: your own configuration (a dataclass, dict or argparse Namespace), written
            into the run record.
        record: a run directory with ``record.json``, ``metrics.jsonl`` and ``console.log``
            (default ``./runs/<UTC time>-<script>``; a :class:`~stoker.records.RecordConfig`
            to change it, ``False`` for none).
        checkpoint: when to checkpoint automatically: every N steps (``checkpoint=500``), or a
            :class:`~stoker.checkpoint.CheckpointConfig` (every N steps / T minutes, keep K,
            async); a final checkpoint is written when the run ends normally.
        resume: ``"auto"`` continues from the newest valid checkpoint of this run directory
            (after an elastic restart, or with ``$STOKER_RUN_DIR`` set); a path resumes from
            another run's checkpoints; ``"never"`` ignores checkpoints.
        doctor: profile a window of steps (after a short warm-up) on the main rank and print
            what to change when the run ends, also written to ``doctor.json`` in the run
            directory (a :class:`~stoker.doctor.DoctorConfig` to tune, ``False`` or
            ``$STOKER_DOCTOR=0`` for none). Outside its window it costs nothing measurable.

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
        config: Any = None,
        record: RecordConfig | bool = True,
        checkpoint: CheckpointConfig | int | None = None,
        resume: str | Path = "auto",
        doctor: DoctorConfig | bool = True,
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
        if not (resume in RESUME_CHOICES or isinstance(resume, str | Path)):
            raise StokerError(f"resume={resume!r}; use 'auto', 'never' or a run directory path")
        self.services = RunServices(
            record=record,
            checkpoint=checkpoint,
            resume=resume,
            user_config=config,
            settings=self.settings,
            rank=self.rank,
            world_size=self.world_size,
        )
        self.resumed_from: int | None = None
        """The step this run resumed from, or None for a fresh start."""
        self._loaders: list[PreparedLoader] = []
        self._tracked: TrackedState | None = None
        # Checkpoint entries that must be exact as of the optimizer step (see boundary.py),
        # and their copies while a due checkpoint waits for its write.
        self._boundary_keys: tuple[str, ...] = ()
        self._boundary: StepBoundary | None = None
        self._same_data: SameDataCheck | None = None
        self._closed = False
        self._micro_batch = _MicroBatch(self)
        self._doctor_config = doctor
        self.doctor: Doctor | None = None
        self._doctor_active = True
        self._lifecycle = Lifecycle(self.close)

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
    def prepare(
        self,
        model: nn.Module,
        *objects: Any,
        scheduler: Any = None,
        state: dict[str, Any] | None = None,
    ) -> Any:
        """Ready a model, its optimizer and any data loaders for this device and process group.

        ``prepare(model, optimizer, *loaders, scheduler=None, state=None)`` returns the same
        objects in the same order (the scheduler last, if given): the model on the device,
        wrapped in ``DistributedDataParallel`` when several processes run, compiled when
        asked, its forward under the precision policy's autocast; the optimizer stepping once
        per accumulation window; each loader yielding this rank's shard on the device.

        ``state``: your own state to checkpoint and restore on resume, by name: dicts of plain
        values and tensors (restored in place: the epoch, a learning rate you manage, the best
        validation loss, an RNN's carried hidden state) or objects with ``state_dict()`` /
        ``load_state_dict()``; see :mod:`stoker.runtime.tracked`. Checkpoints hold it as of
        the optimizer step (update it before ``optimizer.step()``), and it is restored here,
        before ``prepare`` returns.
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
                loader = PreparedLoader(shard_loader(obj, self.dist, seed), self.device, self)
                self._loaders.append(loader)
                prepared.append(loader)
            else:
                raise StokerError(
                    f"prepare() does not know what to do with a {type(obj).__name__}; it takes "
                    "an nn.Module, optimizers and DataLoaders (and scheduler=...)"
                )
        if scheduler is not None:
            prepared.append(PreparedScheduler(scheduler, self))
        if state is not None:
            if self._tracked is not None or self.services.state is not None:
                raise StokerError(
                    "prepare(state=...) was already given, or prepare() already ran: pass all "
                    "your state to the first prepare() call, in one dict"
                )
            self._tracked = TrackedState(state, self.device)
        if self._same_data is None and self.dist.enabled:
            self._same_data = SameDataCheck(prepared[0], self.device)
        self._attach(model, scheduler)
        return prepared[0] if len(prepared) == 1 else tuple(prepared)

    def _attach(self, model: nn.Module, scheduler: Any) -> None:
        """Hand everything prepare() saw to the checkpointer; resume into it if asked."""
        if self.services.state is not None:
            return  # attached at the first prepare(); later objects are not checkpointed
        state: dict[str, Any] = {"model": model, "stoker": self}
        for i, optimizer in enumerate(self._optimizers):
            state[f"optimizer{i or ''}"] = optimizer
        if scheduler is not None:
            state["scheduler"] = scheduler
        keys = ["stoker"]  # exact as of the optimizer step, see boundary.py
        for i, loader in enumerate(self._loaders):
            state[f"loader{i or ''}"] = loader
            keys.append(f"loader{i or ''}")
        if self._tracked is not None:
            state["user"] = self._tracked
            keys.append("user")
        self._boundary_keys = tuple(keys)
        self._start_doctor()
        self.resumed_from = self.services.attach(state)
        if self.resumed_from is not None:
            self.print(f"stoker: resumed from step {self.resumed_from} ({self.services.run_dir})")
            if not self._loaders:
                self.services.restore_rng_after_replay()
        self._at_step_boundary()  # a checkpoint of step 0 holds the state the loop starts in

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
    def accumulate(self, model: nn.Module) -> _MicroBatch:
        """One micro-batch of a gradient-accumulation window (a context manager).

        On all but the last micro-batch of each window of ``accumulation_steps``, DDP's
        gradient all-reduce is skipped and the prepared optimizer's ``step``/``zero_grad`` do
        nothing; :attr:`sync_gradients` says which kind of micro-batch this is.
        """
        self._micro_batch.model = model
        return self._micro_batch

    def backward(self, loss: torch.Tensor, *, tokens: torch.Tensor | int | None = None) -> None:
        """Backpropagate ``loss`` for this micro-batch.

        Without ``tokens``, the loss is divided by ``accumulation_steps`` (right when every
        micro-batch has the same size). With ``tokens`` — the number of tokens ``loss`` is a
        mean over, as a device tensor — the window's gradient becomes the mean over *all* its
        tokens on all ranks: each micro-batch contributes ``loss * tokens`` and the sum is
        divided by the global token count before clipping and stepping. The count never
        leaves the device.
        """
        if self.step != self.services._checked_step:  # an int comparison; a save when due
            self._checkpoint_point()
        if self._same_data is not None:
            check, self._same_data = self._same_data, None
            check.check(self.rank, self.world_size)
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

    def _start_doctor(self) -> None:
        from stoker.doctor import Doctor, DoctorConfig, active_doctor

        wanted = self._doctor_config
        if wanted is False or os.environ.get("STOKER_DOCTOR", "1") == "0" or not self.is_main:
            return
        if active_doctor() is not None:  # under `stoker doctor script.py`: that one reports
            return
        config = wanted if isinstance(wanted, DoctorConfig) else DoctorConfig()
        self.doctor = Doctor(config).attach(auto_step=False)

    def _doctor_step(self) -> None:
        doctor = self.doctor
        assert doctor is not None
        doctor.step()
        if doctor.done or doctor.failed is not None:
            doctor.detach()  # its window is over: no hook stays on the training path
            self._doctor_active = False

    def _doctor_report(self) -> None:
        doctor = self.doctor
        if doctor is None:
            return
        doctor.detach()
        try:
            report = doctor.report()
        except StokerError as exc:
            log.info("stoker doctor: no report: %s", exc)
            return
        report.print()
        if self.run_dir is not None:
            report.write_json(self.run_dir)

    def _after_step(self) -> None:
        if self.doctor is not None and self._doctor_active:
            self._doctor_step()
        self.step += 1
        self._tokens = None
        self._plain_backward = False
        self._finalized = False
        self._at_step_boundary()

    def _at_step_boundary(self) -> None:
        # An int comparison or two, unless a save is due: then copy, see boundary.py.
        state = self.services.state
        if state is not None and self.services.due(self.step):
            self._boundary = capture_boundary(self.step, state, self._boundary_keys)

    def step_done(self) -> None:
        """Mark an optimizer step of a loop that updates the weights itself.

        A prepared optimizer counts its steps; a loop without one (word_language_model's
        ``p.data.add_(p.grad, alpha=-lr)``) calls this right after its update, so that
        :attr:`step` advances and periodic checkpoints, the doctor and ``stoker.log`` see the
        step. Under :meth:`accumulate` it counts only the last micro-batch of a window
        (update the weights only ``if stoker.sync_gradients``). Do not call it after a
        prepared optimizer's ``step()``: that step is already counted.

        Example:
            >>> import torch
            >>> from stoker import Stoker
            >>> stoker = Stoker(device="cpu", precision="fp32", record=False)
            >>> model = stoker.prepare(torch.nn.Linear(4, 2))
            >>> stoker.backward(model(torch.randn(8, 4)).square().mean())
            >>> with torch.no_grad():
            ...     for p in model.parameters():
            ...         _ = p.add_(p.grad, alpha=-0.1)
            >>> stoker.step_done(); model.zero_grad()
            >>> stoker.step
            1
        """
        if self.sync_gradients:
            self._after_step()

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor | None:
        """Clip the prepared models' gradients; returns the total norm as a device tensor.

        On non-final micro-batches of an accumulation window it does nothing and returns None.
        """
        if not self.sync_gradients:
            return None
        self._finalize_gradients()
        return torch.nn.utils.clip_grad_norm_(self._params, max_norm, norm_type, foreach=True)

    # -- records and checkpoints --------------------------------------------------------
    @property
    def run_dir(self) -> Path | None:
        """This run's directory (record, metrics, checkpoints), or None with record=False."""
        return self.services.run_dir

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Append ``metrics`` to the run's ``metrics.jsonl`` (main rank).

        Values may be device tensors: they are resolved off the training thread, so logging
        never makes the loop wait for the device.
        """
        if self.is_main:
            self.services.log(metrics, self.step if step is None else step)

    def save_checkpoint(self) -> Path | None:
        """Checkpoint now (all ranks must call it); returns the checkpoint directory.

        Does nothing in a process forked from the training process (a DataLoader worker).
        """
        if not self._lifecycle.owns_process():
            return None
        return self.services.save(self.step)

    def close(self, failed: BaseException | None = None) -> None:
        """End the run: final checkpoint and doctor report (unless it failed), pending writes
        finished, the record closed as finished, failed or killed.

        Runs by itself at interpreter exit, knowing whether an exception is ending the program;
        call it to end earlier, with ``failed=exc`` if the run failed. Ranks leave together: a
        rank exiting while another still talks to it would abort that one; a rank that does not
        come within ``$STOKER_COLLECTIVE_TIMEOUT`` seconds (default 300) fails the others with
        :class:`~stoker.runtime.distributed.CollectiveTimeout`. Does nothing in a process forked
        from the training process (a DataLoader worker).
        """
        if self._closed or not self._lifecycle.owns_process():
            return
        self._closed = True
        failure = failed if failed is not None else self._lifecycle.failure
        try:
            self.services.close(self.step, failed=failure is not None)
            if failure is None:  # a failed run has nothing to diagnose
                self._doctor_report()
            elif self.doctor is not None:  # but its profiler must not outlive the run
                self.doctor.detach()
            # A failed rank leaves at once (its peers fail in turn, and torchrun restarts the
            # job); the others wait for each other, for at most STOKER_COLLECTIVE_TIMEOUT.
            if failure is None and self.dist.group is not None and dist.is_initialized():
                wait_for_ranks(self.dist.group, "the end of the run (Stoker.close)")
        except BaseException as exc:
            failure = exc
            raise
        finally:
            self.services.finish(failure)
            if failure is None and self.dist.owns_group and dist.is_initialized():
                dist.destroy_process_group()

    def _checkpoint_point(self, live: bool = False) -> None:
        """The start of a micro-batch: write a due checkpoint (one integer comparison per
        micro-batch otherwise). ``live``: nothing moved since the step (a prepared loader
        about to fetch), so the live state is written; else the step's copies."""
        if self.step != self.services._checked_step:
            boundary, self._boundary = self._boundary, None
            self.services.after_step(self.step, None if live else boundary, live=live)

    def _services_resumed(self) -> None:
        if self.services.pending is not None:
            self.services.restore_rng_after_replay()

    def state_dict(self) -> dict[str, Any]:
        """Step counters, the grad scaler and the setup (see :mod:`stoker.runtime.setup`):
        what a checkpoint needs of the runtime."""
        state: dict[str, Any] = {
            "step": self.step,
            "micro_step": self._micro_step,
            "skipped_steps": self.skipped_steps,
            "setup": self.services.setup.state_dict(),
        }
        if self._scaler is not None:
            state["scaler"] = self._scaler.state_dict()
        return state

    def check_state_dict(self, state: dict[str, Any]) -> None:
        """Refuse a checkpoint of another world size or seed (before anything is loaded)."""
        self.services.setup.check(state.get("setup"))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self._micro_step = int(state["micro_step"])
        self.skipped_steps = int(state["skipped_steps"])
        self.services.setup.restored(state.get("setup"))
        if "settings.accumulation_steps" in self.services.setup.changes():
            self._micro_step = self.step * self.accumulation_steps  # a window starts here
        if self._scaler is not None and "scaler" in state:
            self._scaler.load_state_dict(state["scaler"])

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
        barrier(self.dist, "Stoker.wait_for_everyone()")
