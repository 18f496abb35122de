"""Checkpoints every N steps and/or T minutes, auto-resume, keep-last-K and a fault policy.

    ckpt = Checkpointer("runs/my-run/checkpoints", CheckpointConfig(every_steps=500))
    state = {"model": model, "optimizer": opt, "scheduler": sched, "sampler": sampler}
    start = ckpt.resume(state) or 0          # newest checkpoint that verifies, if any
    for step in range(start + 1, total + 1):
        ...train one step...
        ckpt.maybe_save(step, state)         # O(1) unless a save is due
    ckpt.save(total, state)                  # the final one
    ckpt.close()                             # waits for a background save

Fault policy (``on_error``): when a save fails because of the filesystem (disk full, no
permission, read-only, quota), the partial checkpoint is removed and earlier ones are untouched
and loadable. ``"warn"`` (default) emits one :class:`CheckpointWarning` per failed save, saying
what failed and that training goes on, and keeps training; ``"raise"`` raises
:class:`CheckpointError` with the same one-line message (the run stops; stoker's excepthook
prints it without a traceback). Mistakes in the state itself (an object that is neither data nor
stateful) always raise: they would fail every time. So does a rank missing from a save's
agreement under ``torch.distributed`` (:class:`~stoker.runtime.distributed.CollectiveTimeout`,
after ``$STOKER_COLLECTIVE_TIMEOUT`` seconds): without it, training cannot go on.

``async_save``: the step's state is copied to CPU memory (the only time the loop waits), then a
background thread writes, hashes and renames. A failure is reported at the next call. A new
save while one is still writing first waits for it.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from stoker.checkpoint._dist import Coordinator
from stoker.checkpoint.errors import CheckpointError, CheckpointMismatch, CheckpointWarning
from stoker.checkpoint.interval import AutoInterval
from stoker.checkpoint.resume import (
    checkpoint_name,
    list_checkpoints,
    prune,
    remove_leftovers,
)
from stoker.checkpoint.state import snapshot
from stoker.checkpoint.store import Restore, prepare_load, write_snapshot
from stoker.errors import StokerError, install_excepthook
from stoker.runtime.distributed import CollectiveTimeout

__all__ = ["CheckpointConfig", "Checkpointer"]

log = logging.getLogger(__name__)

ON_ERROR = ("warn", "raise")
# Fault injection for `stoker check-resume`: SIGKILL this process when maybe_save() is called
# with this step (before saving), on every rank or only on STOKER_FAULT_KILL_RANK.
KILL_AT_STEP_ENV = "STOKER_FAULT_KILL_AT_STEP"
KILL_RANK_ENV = "STOKER_FAULT_KILL_RANK"
_REFUSED = -2  # rank 0 tells the other ranks that it refused the checkpoint (a mismatch)
# Under torch.distributed, ranks agree on a time-triggered save every this many steps (one
# tiny CPU all-reduce), so a checkpoint may come up to this many steps after T minutes.
_TIME_AGREE_EVERY = 10


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    """When to checkpoint, how many to keep, and what a failed save does."""

    every_steps: int | None = None
    """Save when ``step % every_steps == 0``; None: not step-triggered."""
    every_minutes: float | None = None
    """Save when this many minutes passed since the last save (or the start); None: never."""
    every: Literal["auto"] | None = None
    """``"auto"``: the interval that minimises expected lost time for ``mtbf_hours``, from
    the save cost and step time measured during the run (Young–Daly; see
    :mod:`stoker.checkpoint.interval`), re-planned after every save."""
    mtbf_hours: float | None = None
    """Mean time between failures of the job (for ``every="auto"``): e.g. 0.25 at 100k GPUs,
    24 for a few nodes."""
    keep_last: int | None = 3
    """Delete older checkpoints beyond the newest K after each successful save; None keeps all."""
    on_error: Literal["warn", "raise"] = "warn"
    """A save failing on the filesystem: ``"warn"`` and continue, or ``"raise"`` and stop."""
    async_save: bool = False
    """Copy the state to CPU memory, then write on a background thread. Costs one copy of the
    state in host memory, kept between saves (reused buffers make the copy ~2.5x faster)."""

    def __post_init__(self) -> None:
        if self.every_steps is not None and self.every_steps < 1:
            raise StokerError(
                f"every_steps={self.every_steps}; use a positive number of steps or None"
            )
        if self.every_minutes is not None and not self.every_minutes > 0:
            raise StokerError(
                f"every_minutes={self.every_minutes}; use a positive number of minutes or None"
            )
        if self.every is not None:
            if self.every != "auto" or not (self.mtbf_hours is not None and self.mtbf_hours > 0):
                raise StokerError(
                    f"every={self.every!r}, mtbf_hours={self.mtbf_hours}; use every='auto' with "
                    "the job's mean time between failures, e.g. mtbf_hours=4"
                )
            if self.every_steps is not None:
                raise StokerError("every='auto' sets the interval itself; drop every_steps")
        if self.keep_last is not None and self.keep_last < 1:
            raise StokerError(
                f"keep_last={self.keep_last}; keep at least 1 checkpoint, or None to keep all"
            )
        if self.on_error not in ON_ERROR:
            raise StokerError(f"on_error={self.on_error!r}; choose one of {ON_ERROR}")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise StokerError(f"environment variable {name}={value!r} is not an integer") from None


# Niceness of the background writer (and the hashing thread it starts, which inherits it):
# it then mostly runs when the training threads leave a core idle, instead of making their
# OpenMP teams wait for a descheduled member.
_WRITER_NICE = 10


def _lower_thread_priority() -> None:
    """Lower this thread's scheduling priority (Linux: nice applies per thread)."""
    get_id = getattr(threading, "get_native_id", None)
    if get_id is None or not hasattr(os, "setpriority") or not sys.platform.startswith("linux"):
        return
    try:
        tid = get_id()
        os.setpriority(
            os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + _WRITER_NICE)
        )
    except OSError:
        pass


class Checkpointer:
    """Periodic atomic checkpoints of a state dict into ``directory/step-NNNNNNNN/``.

    Create it on every rank at the same point of the program (under ``torch.distributed`` it
    creates a small gloo group for the ranks to agree on each save).
    """

    def __init__(self, directory: str | Path, config: CheckpointConfig | None = None) -> None:
        self.directory = Path(directory)
        self.config = config or CheckpointConfig()
        self._coord = Coordinator()
        # A second group for time-trigger votes and auto-interval plans from the loop's
        # thread, so they never interleave with a background save's collectives.
        separate = self.config.every_minutes is not None or self.config.every == "auto"
        self._vote = Coordinator() if separate else self._coord
        self._last_time = time.monotonic()
        self._last_step: int | None = None
        self.auto: AutoInterval | None = None
        """With ``every="auto"``: the measured costs and the planned next save."""
        if self.config.every == "auto" and self.config.mtbf_hours is not None:
            self.auto = AutoInterval(self.config.mtbf_hours * 3600)
            self.auto.started(0)
        self.latest: Path | None = None
        """The newest checkpoint this object saved or resumed from."""
        self.failures = 0
        """Saves that failed (filesystem errors) so far."""
        self.before_save: Callable[[], None] | None = None
        """Called just before each save is taken, on the thread that saves: the run
        record writes its queued metrics there, so a checkpointed step never lacks its metrics
        after a SIGKILL (a resume logs the later steps again)."""
        self.sharded: str | None = None
        """The key of a sharded (FSDP) model in the state: it and the state's optimizers are
        written by every process through DCP (see :mod:`stoker.checkpoint.sharded`), and such
        saves are synchronous: DCP's collectives share the process group with the training
        step, so they cannot run on a background thread."""
        self._thread: threading.Thread | None = None
        # Host buffers reused by every async snapshot (one copy of the state in host memory).
        self._pool: dict[tuple[str, str], Any] = {}
        self._pending_error: StokerError | None = None
        self._kill_at = _env_int(KILL_AT_STEP_ENV)
        kill_rank = _env_int(KILL_RANK_ENV)
        if kill_rank is not None and kill_rank != self._coord.rank:
            self._kill_at = None
        if self.config.on_error == "raise":
            install_excepthook()

    @property
    def rank(self) -> int:
        return self._coord.rank

    # -- resume ------------------------------------------------------------------------
    def resume(
        self,
        state: dict[str, Any],
        *,
        rank_state: dict[str, Any] | None = None,
        strict: bool = True,
    ) -> int | None:
        """Load the newest usable checkpoint into ``state``; returns its step or None.

        Newest first, a checkpoint is skipped with a warning naming it when it fails
        verification (corrupt, truncated, planted) or does not hold together (an optimizer
        moment of the wrong shape, a data position past the end of its loader); the previous
        one is tried, and nothing was restored from the skipped one. A checkpoint that is
        intact but does not fit this run (:class:`CheckpointMismatch`: another model shape,
        batch size or number of processes) stops the resume: the older ones of the same run
        would not fit either. Under ``torch.distributed`` rank 0 chooses and every rank loads
        the same one.
        """
        self.wait()
        restore: Restore | None = None
        refused: CheckpointMismatch | None = None
        step = -1
        if self.rank == 0:
            remove_leftovers(self.directory)
            for found, path in reversed(list_checkpoints(self.directory)):
                try:
                    restore = prepare_load(
                        path, state, rank_state=rank_state, strict=strict, root=self.directory
                    )
                except CheckpointMismatch as exc:
                    refused, step = exc, _REFUSED
                    break
                except CheckpointError as exc:
                    warnings.warn(
                        f"skipping checkpoint {path}: {exc}; trying the previous one",
                        CheckpointWarning,
                        stacklevel=2,
                    )
                    continue
                step = found
                break
        step = self._coord.broadcast_int(step)
        if refused is not None:
            raise refused
        if step == _REFUSED:
            raise CheckpointMismatch(
                f"rank {self.rank}: rank 0 refused to resume from {self.directory} (its "
                "message says why)"
            )
        if step < 0:
            return None
        if restore is None:  # not rank 0: load the one rank 0 chose, verifying it here too
            chosen = dict(list_checkpoints(self.directory)).get(step)
            if chosen is None:
                raise CheckpointError(
                    f"rank {self.rank} cannot see checkpoint step {step} under {self.directory}; "
                    "the checkpoint directory must be on a filesystem every rank shares"
                )
            restore = prepare_load(
                chosen, state, rank_state=rank_state, strict=strict, root=self.directory
            )
        restore.apply()
        self.latest = restore.directory
        self._last_step = step
        self._last_time = time.monotonic()
        if self.auto is not None:
            self.auto.started(step)
        log.info("resumed from %s", restore.directory)
        return step

    # -- save ----------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        """Whether :meth:`maybe_save` would save at ``step`` (same answer on every rank)."""
        if step == self._last_step:
            return False
        cfg = self.config
        if cfg.every_steps is not None and step % cfg.every_steps == 0:
            return True
        if self.auto is not None and step >= self.auto.next_step:
            return True  # rank 0 planned it and every rank holds the same plan
        if cfg.every_minutes is None:
            return False
        if self._vote.enabled and step % _TIME_AGREE_EVERY != 0:
            return False
        elapsed = time.monotonic() - self._last_time >= cfg.every_minutes * 60
        # Rank 0's clock decides, so every rank saves at the same step.
        return self._vote.broadcast_int(int(elapsed)) == 1 if self._vote.enabled else elapsed

    def next_check(self, step: int) -> int:
        """The first step after ``step`` at which :meth:`maybe_save` may have something to do
        (a save due, a fault to inject, a background write's failure to report). A loop may
        skip asking before it: that keeps a checkpoint's per-step cost one integer comparison.
        Valid until the next call of :meth:`maybe_save` or :meth:`save`."""
        if self._pending_error is not None or (
            self._thread is not None and self._thread.is_alive()
        ):
            return step + 1  # report a background failure at the step after it happened
        cfg = self.config
        upcoming = sys.maxsize
        if cfg.every_minutes is not None:
            if not self._vote.enabled:
                return step + 1  # the clock decides: ask every step
            upcoming = (step // _TIME_AGREE_EVERY + 1) * _TIME_AGREE_EVERY
        if cfg.every_steps is not None:
            upcoming = min(upcoming, (step // cfg.every_steps + 1) * cfg.every_steps)
        if self.auto is not None:
            upcoming = min(upcoming, max(self.auto.next_step, step + 1))
        if self._kill_at is not None and self._kill_at > step:
            upcoming = min(upcoming, self._kill_at)
        return upcoming

    def maybe_save(
        self, step: int, state: Mapping[str, Any], *, rank_state: Mapping[str, Any] | None = None
    ) -> bool:
        """Save if a save is due at ``step``; returns whether one was started. Call every step."""
        if self._kill_at is not None and step == self._kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # fault injection (check-resume)
        self._report_pending()
        if not self.due(step):
            return False
        started = self.save(step, state, rank_state=rank_state) is not None
        return started or (self.config.async_save and self.sharded is None)

    def save(
        self, step: int, state: Mapping[str, Any], *, rank_state: Mapping[str, Any] | None = None
    ) -> Path | None:
        """Save now as ``step-NNNNNNNN``; returns its path (None if it failed under "warn").

        With ``async_save`` the path is returned once the state is copied; the files are
        complete after :meth:`wait`.
        """
        started = time.monotonic()
        self.wait()  # a previous background write must finish before its buffers are reused
        target = self.directory / checkpoint_name(step)
        if step == self._last_step and self.latest == target and target.exists():
            return target
        if self.before_save is not None:
            self.before_save()
        async_save = self.config.async_save and self.sharded is None
        snap = snapshot(
            state,
            rank=self._coord.rank,
            world_size=self._coord.world_size,
            rank_state=rank_state,
            copy=async_save,
            pool=self._pool if async_save else None,
            sharded=self.sharded,
        )
        self._last_step = step
        self._last_time = time.monotonic()
        if async_save:
            self._thread = threading.Thread(
                target=self._write_in_background,
                args=(target, snap, step),
                name="stoker-checkpoint",
            )
            self._thread.start()
            self._plan_next(step, time.monotonic() - started)
            return target
        try:
            self._write(target, snap, step)
        except CheckpointError as exc:
            self._plan_next(step, time.monotonic() - started)
            self._failed(exc)
            return None
        self._plan_next(step, time.monotonic() - started)
        return target

    def _plan_next(self, step: int, blocked_seconds: float) -> None:
        if self.auto is None:
            return
        planned = self.auto.saved(step, blocked_seconds)
        if self._vote.enabled:  # rank 0's measurement decides, so every rank saves together
            self.auto.next_step = self._vote.broadcast_int(planned)

    def _write(self, target: Path, snap: Any, step: int) -> None:
        write_snapshot(target, snap, self._coord, step=step)
        self.latest = target
        if self.config.keep_last is not None and self._coord.rank == 0:
            prune(self.directory, self.config.keep_last, protect=target)

    def _write_in_background(self, target: Path, snap: Any, step: int) -> None:
        _lower_thread_priority()
        try:
            self._write(target, snap, step)
        except (CheckpointError, CollectiveTimeout) as exc:
            self._pending_error = exc
        except Exception as exc:  # never lose a background failure silently
            self._pending_error = CheckpointError(f"could not save checkpoint {target}: {exc!r}")

    def _failed(self, exc: StokerError) -> None:
        self.failures += 1
        if not isinstance(exc, CheckpointError):  # a rank is gone: training cannot go on
            raise exc
        if self.config.on_error == "raise":
            raise exc
        previous = f"the latest good one is {self.latest}" if self.latest else "none saved yet"
        warnings.warn(
            f"{exc} ({previous}); training continues (on_error='warn')",
            CheckpointWarning,
            stacklevel=4,
        )

    def _report_pending(self) -> None:
        if self._pending_error is not None and (
            self._thread is None or not self._thread.is_alive()
        ):
            exc, self._pending_error = self._pending_error, None
            self._failed(exc)

    def wait(self) -> None:
        """Block until a background save (if any) has finished; report its failure."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._report_pending()

    def close(self) -> None:
        """Finish any background save. Call at the end of training."""
        self.wait()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
