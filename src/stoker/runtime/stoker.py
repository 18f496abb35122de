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
import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from stoker.errors import Preempted, StokerError, install_excepthook
from stoker.runtime.device import check_compile, resolve_device
from stoker.runtime.distributed import (
    DistributedContext,
    barrier,
    init_distributed,
    is_rank_aware,
    shard_loader,
)
from stoker.runtime.lifecycle import Lifecycle
from stoker.runtime.listeners import DoctorListener, RanksListener, RecordListener
from stoker.runtime.model import PreparedModel, unwrap_model
from stoker.runtime.precision import PrecisionPolicy, resolve_precision
from stoker.runtime.preemption import PreemptionConfig, PreemptionListener
from stoker.runtime.prepared import (
    DataClock,
    PreparedLoader,
    PreparedOptimizer,
    PreparedScheduler,
    order_seed,
)
from stoker.runtime.same_data import SameDataCheck
from stoker.runtime.services import RESUME_CHOICES, RunServices
from stoker.runtime.step import MicroBatch, TrainingStep
from stoker.runtime.strategy import FSDPConfig, place_model, rebind_optimizer, resolve_strategy
from stoker.runtime.tracked import TrackedState

if TYPE_CHECKING:
    from stoker.checkpoint import CheckpointConfig
    from stoker.doctor import Doctor, DoctorConfig
    from stoker.meters import MetersConfig, StepMeters
    from stoker.records import RecordConfig, Tracker

__all__ = ["Stoker"]

log = logging.getLogger(__name__)


def _meters_config(meters: Any) -> MetersConfig | None:
    from stoker.meters import MetersConfig

    if meters is True:
        return MetersConfig()
    if meters is False:
        return None
    if isinstance(meters, MetersConfig):
        return meters
    raise StokerError(f"meters={meters!r}; pass True, False or a stoker.meters.MetersConfig")


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
        strategy: how several processes hold the model: ``"auto"`` (replicated with
            ``DistributedDataParallel``), ``"ddp"``, or ``"fsdp"``: sharded with FSDP2, each
            process holding 1/N of the parameters, gradients and optimizer state (every
            ``nn.ModuleList`` entry a unit of sharding; a :class:`FSDPConfig` to choose
            others); checkpoints are then written as shards any number of processes can
            resume from. See :mod:`stoker.runtime.strategy`.
        activation_checkpointing: recompute each block's activations in the backward instead
            of keeping them (less memory for about one more forward): ``True`` for every
            ``nn.ModuleList`` entry, or module classes / ``fn(name, module)`` to choose.
        meters: tokens/s, samples/s, step time p50/p99, data-wait share, achieved FLOP/s, MFU
            against this machine's measured peak and peak memory, on the main rank, into
            ``metrics.jsonl`` every 25 steps and ``record.json`` at the end (a
            :class:`~stoker.meters.MetersConfig` to change the cadence or give the FLOPs per
            step, ``False`` for none); see :mod:`stoker.meters.live`. :attr:`meters` reads them.
        trackers: also send what :meth:`log` and the meters log, the config and the run record
            to ``"tensorboard"`` (event files in the run directory) and/or ``"mlflow"`` (a
            local store in the run directory, or ``stoker.records.MLflowTracker(uri=...)``);
            optional extras: ``pip install 'stoker[tensorboard]'`` / ``'stoker[mlflow]'``.
            ``metrics.jsonl`` stays the source of truth; see :mod:`stoker.records.trackers`.
        preemption: on SIGTERM, SIGINT or SIGUSR1 (what SLURM, torchrun and Ctrl-C send), all
            ranks save the checkpoint of the step and the process exits with code 143
            (:data:`~stoker.errors.PREEMPTED_EXIT_CODE`; record status ``preempted``);
            ``resume="auto"`` continues exactly. A :class:`~stoker.PreemptionConfig` for other
            signals, ``False`` to leave signals alone. See :mod:`stoker.runtime.preemption`.

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
        strategy: str | FSDPConfig = "auto",
        activation_checkpointing: Any = False,
        meters: MetersConfig | bool = True,
        trackers: Sequence[str | Tracker] = (),
        preemption: PreemptionConfig | bool = True,
    ) -> None:
        install_excepthook()
        if not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise StokerError(
                f"accumulation_steps={accumulation_steps!r} must be a positive integer"
            )
        if not isinstance(compile, bool):
            raise StokerError(f"compile={compile!r} must be True or False")
        if not isinstance(preemption, PreemptionConfig | bool):
            raise StokerError(
                f"preemption={preemption!r}; pass True (the default), False or a "
                "stoker.PreemptionConfig"
            )
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.policy = PrecisionPolicy(self.precision, self.device.type)
        self.strategy, self._fsdp = resolve_strategy(strategy)
        if self._fsdp is not None and self.precision == "fp16":
            raise StokerError(
                "strategy='fsdp' with precision='fp16' is not supported (it needs a sharded "
                "grad scaler); use precision='bf16'"
            )
        self._checkpointing = activation_checkpointing
        if compile:
            check_compile(self.device)
        self.compile = compile
        self.seed = seed
        if seed is not None:
            self.seed_everything(seed)
        self.dist: DistributedContext = init_distributed(self.device)
        # The training step's state and its listeners (see step.py).
        scaler = torch.amp.GradScaler(self.device.type) if self.policy.needs_scaler else None
        self._steps = TrainingStep(
            accumulation_steps=accumulation_steps, scaler=scaler, dist=self.dist
        )
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
            steps=self._steps,
            sharded=self._fsdp is not None,
            trackers=trackers,
        )
        self.resumed_from: int | None = None
        """The step this run resumed from, or None for a fresh start."""
        self._loaders: list[PreparedLoader] = []
        self._renamed: dict[int, nn.Parameter] = {}
        self._tracked: TrackedState | None = None
        self._same_data: SameDataCheck | None = None
        if not self.dist.enabled:
            # One process never checks that ranks got the same data: backward() is the step's
            # own, with no call in between (a measurable share of a small model's step).
            self.backward = self._steps.backward  # type: ignore[method-assign]
        self._closed = False
        self._micro_batch: MicroBatch = self._steps.micro_batch
        self._doctor_config = doctor
        self.doctor: Doctor | None = None
        self._meters_config = _meters_config(meters)
        self.meters: StepMeters | None = None
        """The run's meters (main rank, from the first :meth:`prepare`), or None."""
        self._clock = DataClock() if self._meters_config is not None and self.is_main else None
        # Closed in reverse order: checkpoints and the doctor (attached at prepare), then the
        # ranks' barrier, then the record (see listeners.py).
        self._steps.add_listener(RecordListener(self.services))
        if self.dist.group is not None:
            self._steps.add_listener(RanksListener(self.dist.group))
        self.preemption: PreemptionListener | None = None
        """The run's signal handling (``preemption=False``: None)."""
        if preemption is not False:
            # Before the checkpoints' listener (attached at prepare): its save comes first.
            config = preemption if isinstance(preemption, PreemptionConfig) else PreemptionConfig()
            self.preemption = PreemptionListener(
                config, self.services, self.dist, self._steps.alarm
            )
            self._steps.add_listener(self.preemption)
        self._lifecycle = Lifecycle(self.close)

    # -- the step's counters (owned by self._steps) ------------------------------------------
    @property
    def step(self) -> int:
        """Optimizer steps taken (a Python int: reading it never waits for the device)."""
        return self._steps.step

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step under :meth:`accumulate`."""
        return self._steps.accumulation_steps

    @property
    def skipped_steps(self) -> int:
        """fp16 steps the grad scaler skipped (non-finite gradients)."""
        return self._steps.skipped_steps

    @property
    def sync_gradients(self) -> bool:
        """Whether this micro-batch completes the gradients: the last of its accumulation
        window (always True outside :meth:`accumulate`)."""
        return self._steps.sync_gradients

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
            "strategy": self.strategy,
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
        objects in the same order (the scheduler last, if given): the model moved to the
        device and wrapped, never patched, in a :class:`~stoker.runtime.model.PreparedModel`
        that runs it under the precision policy's autocast (outputs in fp32), through
        ``DistributedDataParallel`` when several processes run, compiled when asked (its
        ``state_dict`` and attributes are your module's; :meth:`unwrap` gives your module
        back); the optimizer stepping once per accumulation window; each loader yielding this
        rank's shard on the device. Each model is prepared once.

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
                rebind_optimizer(obj, self._renamed)
                self._steps.add_optimizer(obj)
                prepared.append(PreparedOptimizer(obj, self._steps))
            elif isinstance(obj, DataLoader):
                seed = self.seed if self.seed is not None else 0
                loader = PreparedLoader(
                    shard_loader(obj, self.dist, order_seed(seed, 0)),
                    self.device,
                    self._steps,
                    seed=seed,
                    replayed=self.services.restore_rng_after_replay,
                    world_invariant=not is_rank_aware(obj),
                )
                loader.clock = self._clock
                self._loaders.append(loader)
                prepared.append(loader)
            else:
                raise StokerError(
                    f"prepare() does not know what to do with a {type(obj).__name__}; it takes "
                    "an nn.Module, optimizers and DataLoaders (and scheduler=...)"
                )
        if scheduler is not None:
            prepared.append(PreparedScheduler(scheduler, self._steps))
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
        for i, optimizer in enumerate(self._steps.optimizers):
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
        self._start_doctor()
        self._start_meters()
        self.resumed_from = self.services.attach(state, tuple(keys))
        if self.services.checkpointer is not None:
            self._steps.add_listener(self.services)
        if self.resumed_from is not None:
            self.print(f"stoker: resumed from step {self.resumed_from} ({self.services.run_dir})")
            if not self._loaders:
                self.services.restore_rng_after_replay()
        # A checkpoint of step 0 (or of the resumed step) holds the state the loop starts in.
        self.services.on_step_end(self.step)

    def _prepare_model(self, model: nn.Module) -> nn.Module:
        if isinstance(model, PreparedModel):
            raise StokerError(
                "this model was already prepared; prepare() takes your own module, once "
                "(keep using the model the first prepare() returned)"
            )
        model.to(self.device)
        placed = place_model(
            model,
            fsdp=self._fsdp,
            checkpointing=self._checkpointing,
            dist=self.dist,
            device=self.device,
            mixed_precision="bf16" if self.precision == "bf16" else "fp32",
            compile=self.compile,
        )
        self._renamed = placed.renamed
        self._steps.add_model(model, placed.ddp, sharded=placed.sharded)
        return PreparedModel(
            model,
            placed.forward,
            # Sharded: FSDP's MixedPrecisionPolicy casts the parameters; no autocast.
            autocast_dtype=None if placed.sharded else self.policy.autocast_dtype,
            device_type=self.device.type,
        )

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        """The user's own module inside the prepared model and any DDP or ``torch.compile``
        wrappers (taken off by type: a child of yours named ``module`` stays yours)."""
        return unwrap_model(model)

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """The precision policy's autocast, for computation outside the prepared model."""
        return self.policy.autocast()

    # -- the step --------------------------------------------------------------------------
    def accumulate(self, model: nn.Module) -> MicroBatch:
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
        if self._same_data is not None:
            check, self._same_data = self._same_data, None
            check.check(self.rank, self.world_size)
        self._steps.backward(loss, tokens=tokens)

    def _start_doctor(self) -> None:
        from stoker.doctor import Doctor, DoctorConfig, active_doctor

        wanted = self._doctor_config
        if wanted is False or os.environ.get("STOKER_DOCTOR", "1") == "0" or not self.is_main:
            return
        if active_doctor() is not None:  # under `stoker doctor script.py`: that one reports
            return
        config = wanted if isinstance(wanted, DoctorConfig) else DoctorConfig()
        self.doctor = Doctor(config).attach(auto_step=False)
        self._steps.add_listener(DoctorListener(self.doctor, self.run_dir))

    def _start_meters(self) -> None:
        from stoker.meters import StepMeters

        if self._meters_config is None or self._clock is None:
            return
        dtype: str = self.precision
        if dtype == "fp32" and self.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
            dtype = "tf32"
        self.meters = StepMeters(
            self._meters_config,
            steps=self._steps,
            clock=self._clock,
            device=self.device,
            dtype=dtype,
            count=not self.compile,
            write=self.services.log_later if self.services.writes_metrics else None,
            record=self.services.summarize_meters,
        )
        self._steps.add_listener(self.meters)

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
        self._steps.step_done()

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor | None:
        """Clip the prepared models' gradients; returns the total norm as a device tensor.

        On non-final micro-batches of an accumulation window it does nothing and returns None.
        """
        return self._steps.clip_grad_norm_(max_norm, norm_type)

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
        self._steps.settle()
        return self.services.save(self.step)

    def close(self, failed: BaseException | None = None) -> None:
        """End the run: final checkpoint and doctor report (unless it failed or was preempted),
        pending writes finished, the record closed as finished, failed, killed or preempted.

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
        if failure is None:
            # A preemption ends the run like an error (no final checkpoint over its own, no
            # doctor report: the grace period is short) but ranks still leave together.
            failure = self.services.preempted
        # Final checkpoint, doctor report, ranks' barrier, record: see listeners.py. Raises
        # the first error any of them raised, once all have closed.
        self._steps.close(failure)
        ended = failure is None or isinstance(failure, Preempted)
        if ended and self.dist.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    def state_dict(self) -> dict[str, Any]:
        """The step's counters and grad scaler, and the setup (see :mod:`stoker.runtime.setup`):
        what a checkpoint needs of the runtime."""
        return {**self._steps.state_dict(), "setup": self.services.setup.state_dict()}

    def check_state_dict(self, state: dict[str, Any]) -> None:
        """Refuse a checkpoint of another world size or seed (before anything is loaded)."""
        self.services.setup.check(state.get("setup"))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.services.setup.restored(state.get("setup"))
        self._steps.load_state_dict(
            state,
            new_window="settings.accumulation_steps" in self.services.setup.changes(),
        )

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
