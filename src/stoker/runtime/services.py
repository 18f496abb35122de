"""What every stoker run gets without asking: a run record, checkpoints and exact resume.

:class:`RunServices` is the runtime's bridge to :mod:`stoker.records` and
:mod:`stoker.checkpoint`. Between the steps a save can be due at
(:meth:`~stoker.checkpoint.Checkpointer.next_check`) it costs nothing: the training step does
not call it. Checkpoints are considered at those steps and written at the start of the next
micro-batch (after the user's ``optimizer.step()`` and ``scheduler.step()``): a prepared
loader's fetch, ``accumulate()`` or ``backward()``, whichever comes first. What must be exact as
of the step itself is copied at the step when a save is due (see
:mod:`stoker.runtime.boundary`). It does so as a :class:`~stoker.runtime.step.StepListener` of
the runtime's training step: ``on_step_end`` copies, ``on_micro_batch`` writes, ``close`` writes
the final checkpoint.

Resume is exact because the data order depends only on (seed, epoch) — see
:class:`~stoker.runtime.prepared.PreparedLoader` — and the position within the epoch is replayed
through the data pipeline before the random generators are put back to their saved state.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stoker.errors import StokerError
from stoker.runtime.boundary import StepBoundary, capture_boundary, written_as_of
from stoker.runtime.setup import RunSetup
from stoker.runtime.step import StepListener, TrainingStep

if TYPE_CHECKING:
    from stoker.checkpoint import CheckpointConfig, Checkpointer
    from stoker.errors import Preempted
    from stoker.records import RecordConfig, Run, Tracker

__all__ = ["RESUME_CHOICES", "RunServices"]

log = logging.getLogger(__name__)

RESUME_CHOICES = ("auto", "never")


@dataclass(slots=True)
class _Pending:
    """Saved random-generator states, restored once the data position has been replayed."""

    rng: dict[str, Any]


class RunServices(StepListener):
    """Run record, metrics, checkpoints and resume for one :class:`~stoker.Stoker`."""

    def __init__(
        self,
        *,
        record: RecordConfig | bool,
        checkpoint: CheckpointConfig | int | None,
        resume: str | Path,
        user_config: Any,
        settings: dict[str, Any],
        rank: int,
        world_size: int,
        steps: TrainingStep,
        sharded: bool = False,
        trackers: Sequence[str | Tracker] = (),
    ) -> None:
        from stoker.checkpoint import CheckpointConfig
        from stoker.records import RecordConfig, start_run
        from stoker.records.trackers import make_trackers

        if isinstance(checkpoint, int) and not isinstance(checkpoint, bool):
            checkpoint = CheckpointConfig(every_steps=checkpoint)
        elif not (checkpoint is None or isinstance(checkpoint, CheckpointConfig)):
            raise StokerError(
                f"checkpoint={checkpoint!r}; pass a number of steps (checkpoint=500) or a "
                "stoker.checkpoint.CheckpointConfig"
            )

        self.setup = RunSetup(settings, user_config)
        """This run's settings and config, compared with a resumed checkpoint's."""
        self.run: Run | None = None
        wanted = make_trackers(trackers) if rank == 0 else []  # a missing extra fails here
        if wanted and record is False:
            raise StokerError(
                "trackers get what the run record's metrics.jsonl gets, but record=False; "
                "pass record=True (the default) or drop trackers"
            )
        if record is not False:
            config = record if isinstance(record, RecordConfig) else RecordConfig()
            self.run = start_run(
                config,
                user_config=user_config,
                settings=settings,
                seeds={"seed": settings.get("seed")},
                rank=rank,
                world_size=world_size,
            )
            self.run.add_trackers(wanted)
        self.checkpoint_config = checkpoint
        self.sharded = sharded
        """Write the model and optimizers as shards (strategy='fsdp'), under the key "model"."""
        self.resume_from = resume
        self.checkpointer: Checkpointer | None = None
        self.state: dict[str, Any] | None = None
        self.pending: _Pending | None = None
        self._steps = steps
        self.preempted: Preempted | None = None
        """Set when a signal preempted the run (see :mod:`stoker.runtime.preemption`): its
        checkpoint is written, the run ends ``preempted``."""
        self._boundary_keys: tuple[str, ...] = ()
        self._boundary: StepBoundary | None = None
        self._checked_step = -1
        self._quiet_until = 0  # no checkpoint business before this step (Checkpointer.next_check)
        self._closed = False

    @property
    def step(self) -> int:
        """The optimizer steps taken: the final checkpoint's step."""
        return self._steps.step

    @property
    def run_dir(self) -> Path | None:
        return self.run.dir if self.run is not None else None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step)

    @property
    def writes_metrics(self) -> bool:
        """Whether this process writes ``metrics.jsonl`` (the main rank of a recorded run)."""
        return self.run is not None and self.run.enabled

    def log_later(self, compute: Callable[[], dict[str, Any]], step: int) -> None:
        if self.run is not None:
            self.run.log_later(compute, step)

    def summarize_meters(self, summary: dict[str, Any]) -> None:
        """The meters' summary, into ``record.json`` (``summary.meters``)."""
        if self.run is not None:
            self.run.add_summary("meters", summary)

    # -- checkpoints ------------------------------------------------------------------------
    def _checkpoint_dir(self) -> Path:
        if self.run is None:
            raise StokerError(
                "checkpoints live in the run directory, but this Stoker was created with "
                "record=False; pass record=True (the default) or a RecordConfig"
            )
        return self.run.dir / "checkpoints"

    def attach(self, state: dict[str, Any], boundary_keys: tuple[str, ...]) -> int | None:
        """Start checkpointing ``state``; resume into it if asked. Returns the resumed step.

        ``boundary_keys``: the entries of ``state`` that must be exact as of the optimizer
        step (copied at the step when a save is due, see :mod:`stoker.runtime.boundary`)."""
        from stoker.checkpoint import CheckpointConfig, Checkpointer, capture_rng

        self.state = state
        self._boundary_keys = boundary_keys
        if self.run is None:
            self._quiet_until = sys.maxsize  # no checkpointer: nothing to do at any step
            return None
        self.checkpointer = Checkpointer(
            self._checkpoint_dir(), self.checkpoint_config or CheckpointConfig()
        )
        self.checkpointer.before_save = self.run.flush_metrics  # see Checkpointer.before_save
        if self.sharded:
            self.checkpointer.sharded = "model"
        if self.resume_from == "never":
            return None
        if self.resume_from != "auto":
            source = Path(self.resume_from)
            if not source.exists():
                raise StokerError(
                    f"resume={str(source)!r} does not exist; pass a run directory, a "
                    "checkpoints directory, 'auto' or 'never'"
                )
            self.checkpointer.directory = (
                source / "checkpoints" if (source / "checkpoints").is_dir() else source
            )
        step = self.checkpointer.resume(state)
        self.checkpointer.directory = self._checkpoint_dir()
        if step is None:
            return None
        self._record_resume(step)
        # The generators are back at their state of the checkpoint; the data pipeline is
        # replayed to its position first (that replay draws random numbers), then they are
        # put back again, see `restore_rng_after_replay`.
        self.pending = _Pending(rng=capture_rng())
        self._checked_step = step
        return step

    def _record_resume(self, step: int) -> None:
        """``record.json``: which checkpoint this attempt resumed from and what changed since
        (``{"settings.precision": {"was": "fp32", "now": "bf16"}}``; the refused changes never
        get here, see :mod:`stoker.runtime.setup`)."""
        if self.run is None or not self.run.enabled or self.checkpointer is None:
            return
        resumed = {
            "step": step,
            "checkpoint": str(self.checkpointer.latest),
            "changed": self.setup.changes(),
        }
        attempts = list(self.run.record.get("attempts") or [])
        if attempts:
            attempts[-1] = {**attempts[-1], "resumed_from": resumed}
        self.run.update(resumed_from=resumed, attempts=attempts)

    def restore_rng_after_replay(self) -> None:
        from stoker.checkpoint import restore_rng

        if self.pending is not None:
            restore_rng(self.pending.rng)
            self.pending = None

    def due(self, step: int) -> bool:
        """Whether a checkpoint of ``step`` is due (asked at the step, from the first step a save
        can be due at: see :meth:`~stoker.checkpoint.Checkpointer.next_check`)."""
        if step == self._checked_step or self.checkpointer is None or self.state is None:
            return False
        return self.checkpointer.due(step)

    # -- as a step listener ------------------------------------------------------------------
    def on_step_end(self, step: int) -> int | None:
        """At the step (and at attach): when a save of ``step`` is due, copy what it must
        hold as of now. Asks to be called again at the next step a save may be due."""
        if step < self._quiet_until:
            return self._quiet_until
        state = self.state
        if state is not None and self.due(step):
            self._boundary = capture_boundary(step, state, self._boundary_keys)
        return step  # this step's on_micro_batch: maybe_save

    def on_micro_batch(self, step: int, live: bool) -> int | None:
        """The start of the next micro-batch: saves when a checkpoint of ``step`` is due, with
        the copies taken at the step (see :mod:`stoker.runtime.boundary`) when there are some,
        else with the live state — unless the state moved since the step (``live`` False: a
        ``backward()`` or ``accumulate()``; ``live``: a prepared loader about to fetch): a save
        that became due only since the step (``every_minutes`` elapsed in between) then waits
        for the next step."""
        checkpointer = self.checkpointer
        if step < self._quiet_until:
            return self._quiet_until
        if step == self._checked_step or checkpointer is None or self.state is None:
            return None
        self._checked_step = step
        boundary, self._boundary = self._boundary, None
        if live or boundary is None or boundary.step != step:
            if not live and checkpointer.due(step):
                return None
            checkpointer.maybe_save(step, self.state)
        else:
            with written_as_of(self.state, boundary) as state:
                checkpointer.maybe_save(step, state)
        self._quiet_until = checkpointer.next_check(step)
        return self._quiet_until

    def hold(self, step: int) -> None:
        """At the step: copy what a checkpoint of ``step`` must hold as of now, whether or not
        one is due (a preemption's save comes next, see :meth:`save_now`)."""
        if self.state is not None and self.checkpointer is not None:
            self._boundary = capture_boundary(step, self.state, self._boundary_keys)

    def save_now(self, step: int, live: bool) -> Path | None:
        """At the start of the next micro-batch: write the checkpoint of ``step`` whatever the
        schedule, with the copies :meth:`hold` took (unless nothing moved since, ``live``), and
        wait until it is complete on disk (the process exits next). Returns its path, or None
        if it could not be written (``on_error="warn"``)."""
        if self.checkpointer is None or self.state is None:
            return None
        started = time.monotonic()
        saved = self._saved(step)
        self._checked_step = step
        boundary, self._boundary = self._boundary, None
        if live or boundary is None or boundary.step != step:
            path = self.checkpointer.save(step, self.state)
        else:
            with written_as_of(self.state, boundary) as state:
                path = self.checkpointer.save(step, state)
        self.checkpointer.wait()
        if not saved:
            self._measured(step, time.monotonic() - started)
        return path

    def _saved(self, step: int) -> bool:
        """Whether the checkpoint of ``step`` is already written (saving it again does
        nothing, and measures nothing)."""
        from stoker.checkpoint import checkpoint_name

        latest = self.checkpointer.latest if self.checkpointer is not None else None
        return latest is not None and latest.name == checkpoint_name(step)

    def _measured(self, step: int, seconds: float) -> None:
        """``record.json``'s ``checkpoint_seconds``: how long the last complete save took (the
        final or a preemption's; ``stoker run`` sizes the workers' grace period from it)."""
        if self.run is not None:
            self.run.update(checkpoint_seconds={"step": step, "seconds": round(seconds, 3)})

    def close(self, failed: BaseException | None) -> None:
        """Final checkpoint (none for a failed run: its state may be broken, nor at step 0, nor
        after a preemption: its own is written); background writes finished."""
        if self._closed:
            return
        self._closed = True
        if self.checkpointer is not None:
            # No step taken, nothing to keep: a checkpoint of step 0 only when asked for
            # (save_checkpoint()) or due by the config.
            final = failed is None and self.preempted is None
            if final and self.state is not None and self.step > 0 and not self._saved(self.step):
                started = time.monotonic()
                self.checkpointer.save(self.step, self.state)
                self.checkpointer.wait()
                self._measured(self.step, time.monotonic() - started)
            self.checkpointer.close()

    def save(self, step: int) -> Path | None:
        if self.state is None:
            raise StokerError("save_checkpoint() needs prepare() to have been called first")
        if self.checkpointer is None:
            self._checkpoint_dir()  # raises the record=False explanation
            return None
        self._checked_step = step
        path = self.checkpointer.save(step, self.state)
        self._quiet_until = self.checkpointer.next_check(step)  # the save may move the plan
        return path

    # -- the end ----------------------------------------------------------------------------
    def finish(self, error: BaseException | None) -> None:
        """Close the record: ``finished``, ``preempted`` with the signal and step, or
        ``failed`` / ``killed`` with ``error``."""
        if self.run is not None:
            self.run.end(self.preempted if self.preempted is not None else error)
