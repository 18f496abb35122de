"""Preemption: a signal asks the run to stop; it saves the checkpoint of the step and exits.

Clusters preempt a job with a signal and a grace period: SLURM sends SIGTERM (or, with
``--signal=B:USR1@120``, SIGUSR1 two minutes ahead) before SIGKILL; torchrun forwards SIGTERM to
its workers and SIGKILLs them 30 s later. Without a handler the run dies with everything since
its last checkpoint. :class:`PreemptionListener`, attached to every :class:`~stoker.Stoker` by
default, turns the signal into a checkpoint:

1. The signal handler only records which signal came (a flag: nothing else is safe in a
   handler, which runs between two bytecodes of whatever the loop was doing).
2. At a step's end the ranks agree. One process needs no call per step: the handler also rings
   the training step's :class:`~stoker.runtime.step.Alarm`, which has the listener called at the
   next boundary, where it reads the flag. Under ``torch.distributed`` the ranks exchange about
   once a second of training (``agree_every_s``): an exchange *starts* an all-reduce (MAX of the
   signal number, two int64 on a small gloo group, asynchronously) and *reads* the one the
   previous exchange started, long finished: a CPU tensor on gloo, so no host-device sync and no
   wait in the loop. Starting one costs ~0.1-1 ms of the loop's thread on a busy 2-core machine,
   hence not every step; steps in between make no call. The same all-reduce carries each rank's
   proposal for the steps until the next exchange (from its measured step time; the smallest
   wins), so every rank reads the same result at the same step and all agree on the step to stop
   at: one to two exchanges after the signal came.
3. The checkpoint of that step is written at the start of the next micro-batch, as a periodic
   one is (after the user's ``scheduler.step()``, with the copies taken at the step, see
   :mod:`stoker.runtime.boundary`), so resuming from it is bitwise exact; it is complete on
   disk before anything else happens (an ``async_save`` is waited for).
4. :class:`~stoker.errors.Preempted` (a ``SystemExit``) ends the program with
   :data:`~stoker.errors.PREEMPTED_EXIT_CODE` (143); ``record.json`` says ``preempted`` with
   the signal and the step; no other final checkpoint is written over it, nor the doctor's
   report (it measures the hardware: seconds the grace period may not have).

A second signal during the save only sets the flag again: the save completes (and checkpoints
are written atomically, so even a SIGKILL leaves the previous one). Ctrl-C twice, more than a
second apart, interrupts at once (KeyboardInterrupt, as without stoker): a loop that never
reaches a step boundary must stay stoppable, while the two SIGINTs of one Ctrl-C under torchrun
(the terminal's and the agent's) come together. Handlers are installed in the main thread only
(Python runs signal handlers there) and the previous ones are put back when the run closes.
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import torch
import torch.distributed as dist

from stoker.errors import PREEMPTED_EXIT_CODE, Preempted, StokerError
from stoker.runtime.distributed import DistributedContext, control_group
from stoker.runtime.step import Alarm, StepListener

if TYPE_CHECKING:
    from stoker.runtime.services import RunServices

__all__ = ["PreemptionConfig", "PreemptionListener"]

log = logging.getLogger(__name__)

_UNCATCHABLE = ("SIGKILL", "SIGSTOP")
_INTERRUPT_AGAIN_S = 1.0  # a second Ctrl-C this long after the first interrupts at once
_MOST_STEPS = 100  # between two exchanges: bounds the wait if the steps slow down later


@dataclass(frozen=True, slots=True, kw_only=True)
class PreemptionConfig:
    """Which signals preempt a run (save the step's checkpoint, exit with code 143).

    Example:
        >>> from stoker import PreemptionConfig
        >>> PreemptionConfig(signals=("SIGUSR1",)).signals
        ('SIGUSR1',)
    """

    signals: tuple[str, ...] = ("SIGTERM", "SIGINT", "SIGUSR1")
    """Signal names; the defaults are what SLURM, torchrun and Ctrl-C send."""
    agree_every_s: float = 1.0
    """Under ``torch.distributed``: about how many seconds of training between two of the
    ranks' exchanges (each costs an all-reduce started; the stop comes one to two exchanges
    after the signal). 0: at every step."""

    def __post_init__(self) -> None:
        if not (isinstance(self.agree_every_s, int | float) and 0 <= self.agree_every_s <= 60):
            raise StokerError(
                f"PreemptionConfig(agree_every_s={self.agree_every_s!r}) must be a number of "
                "seconds from 0 (every step) to 60; the default is 1.0"
            )
        if isinstance(self.signals, str) or not self.signals:
            raise StokerError(
                f"PreemptionConfig(signals={self.signals!r}) must be a non-empty tuple of signal "
                "names, e.g. ('SIGTERM', 'SIGUSR1'); pass preemption=False to handle none"
            )
        for name in self.signals:
            if name in _UNCATCHABLE or not isinstance(getattr(signal, str(name), None), int):
                raise StokerError(
                    f"PreemptionConfig: {name!r} is not a signal a process can handle; use "
                    "names such as SIGTERM, SIGINT, SIGUSR1, SIGUSR2 (SIGKILL and SIGSTOP "
                    "cannot be caught)"
                )


class _Flag:
    """All the signal handler touches: which signal came first, and when. The handler holds
    nothing else, so a Stoker nobody references any more is still collected (its finalizer
    then puts the previous handlers back)."""

    def __init__(self, alarm: Alarm) -> None:
        self.alarm = alarm
        self.received = 0
        """The first signal this process received (its number), 0 for none."""
        self.first_at = 0.0
        self.agreed = False
        self.previous: dict[int, Any] = {}

    def handle(self, signum: int, frame: Any) -> None:
        if not self.received:
            self.received = signum
            self.first_at = time.monotonic()
            self.alarm.ring()  # the step calls its listeners at its next boundary
        elif (
            signum == signal.SIGINT
            and not self.agreed
            and time.monotonic() - self.first_at > _INTERRUPT_AGAIN_S
        ):
            raise KeyboardInterrupt  # Ctrl-C again: the loop may never reach a step boundary

    def install(self, names: tuple[str, ...]) -> None:
        for name in names:
            number = getattr(signal, name)
            self.previous[number] = signal.signal(number, self.handle)

    def restore(self) -> None:
        """Put the previous handlers back where ours is still the one installed."""
        if threading.current_thread() is not threading.main_thread():
            return  # (signal.signal works in the main thread only)
        for number, previous in self.previous.items():
            if signal.getsignal(number) == self.handle:
                signal.signal(number, previous if previous is not None else signal.SIG_DFL)
        self.previous.clear()


class PreemptionListener(StepListener):
    """Handles the configured signals for one run; see the module docstring.

    Create it on every rank at the same point (under ``torch.distributed`` it creates its gloo
    group, a collective).
    """

    def __init__(
        self,
        config: PreemptionConfig,
        services: RunServices,
        ctx: DistributedContext,
        alarm: Alarm,
    ) -> None:
        self.config = config
        self.services = services
        self.is_main = ctx.rank == 0
        self.flag = _Flag(alarm)
        """What the signal handler set (``flag.received``: the signal's number, 0 for none)."""
        self.agreed = 0
        """The signal the ranks agreed to stop on, 0 until they do."""
        self._group: Any = None
        self._work: Any = None
        # [signal number, -steps to the next exchange], reduced in place with MAX (so the
        # ranks get the largest signal and the smallest proposal); its NumPy view reads and
        # writes it without a torch op.
        self._buffer = torch.zeros(2, dtype=torch.int64)
        self._view = self._buffer.numpy()
        self._next_exchange = 0  # the step of the next exchange, the same on every rank
        self._last: tuple[int, float] | None = None  # (step, time) of this rank's last one
        self.exchanges = 0
        """Exchanges this rank made (under ``torch.distributed``; none in one process)."""
        self.exchange_seconds = 0.0
        """The loop's time spent in them (reading the previous all-reduce, starting the next):
        all preemption handling costs the training thread between signals."""
        if ctx.enabled:
            self._group = control_group("the preemption handler's setup (its gloo group)")
        self._restore: weakref.finalize | None = None
        if threading.current_thread() is threading.main_thread():
            self.flag.install(config.signals)
            self._restore = weakref.finalize(self, self.flag.restore)
        else:
            log.info("stoker: Stoker created outside the main thread: no preemption handlers")

    # -- at the step's boundaries ------------------------------------------------------------
    def _next_call(self, step: int) -> int:
        """The step from which this listener next needs a call (see StepListener)."""
        if self.agreed:
            return step  # this step's on_micro_batch saves
        if self._group is not None:
            return self._next_exchange
        # One process: none until a signal comes (its handler rings the step's alarm).
        return step + 1 if self.flag.received else sys.maxsize

    def on_step_end(self, step: int) -> int | None:
        if self.agreed:
            return step
        if self._group is None:
            signum = self.flag.received
        elif step < self._next_exchange:
            return self._next_exchange
        else:
            started = time.perf_counter()
            signum = self._exchange(step)
            self.exchanges += 1
            self.exchange_seconds += time.perf_counter() - started
        if not signum:
            return self._next_call(step)
        self.agreed = signum
        self.flag.agreed = True
        services = self.services
        if services.checkpointer is None or services.state is None:
            self._stop(step, None, 0.0)  # nothing to save: no need to wait for the next batch
        services.hold(step)
        return step

    def _exchange(self, step: int) -> int:
        """The ranks' largest signal number as of the previous exchange (0 for none); unless
        there is one, this exchange's contribution sent on its way and the next one's step
        set from the ranks' smallest proposal (the steps in ``agree_every_s`` at the step time
        measured since this rank's previous exchange)."""
        signum, every = 0, 1
        work = self._work
        if work is not None:
            work.wait()  # started an exchange ago on gloo: done by now
            signum, every = int(self._view[0]), -int(self._view[1])
        if signum:
            self._work = None
            return signum
        now = time.monotonic()
        proposal = 1
        if self._last is not None and now > self._last[1]:
            step_s = (now - self._last[1]) / max(1, step - self._last[0])
            proposal = min(_MOST_STEPS, max(1, math.ceil(self.config.agree_every_s / step_s)))
        self._last = (step, now)
        self._view[0] = self.flag.received
        self._view[1] = -proposal
        self._work = dist.all_reduce(
            self._buffer, op=dist.ReduceOp.MAX, group=self._group, async_op=True
        )
        self._next_exchange = step + every
        return 0

    def on_micro_batch(self, step: int, live: bool) -> int | None:
        if not self.agreed:
            return self._next_call(step)
        started = time.monotonic()
        path = self.services.save_now(step, live)
        self._stop(step, path, time.monotonic() - started)

    def _stop(self, step: int, path: Any, seconds: float) -> NoReturn:
        name = signal.Signals(self.agreed).name
        if self.is_main:
            if self.services.checkpointer is None or self.services.state is None:
                what = "nothing could be saved (no checkpointer: record=False, or no prepare())"
            elif path is None:
                what = "its checkpoint could not be written (see the warning above)"
            else:
                what = f"checkpoint of step {step} written in {seconds:.2f} s ({path})"
            print(
                f"stoker: {name}: preempted at step {step}; {what}; exiting with code "
                f"{PREEMPTED_EXIT_CODE}",
                file=sys.stderr,
                flush=True,
            )
        preempted = Preempted(name, step)
        self.services.preempted = preempted
        raise preempted

    def close(self, failed: BaseException | None) -> None:
        work, self._work = self._work, None
        if work is not None and (failed is None or isinstance(failed, Preempted)):
            work.wait()  # every rank started it: leave no collective behind
        if self._restore is None:
            return
        if self.services.preempted is not None:
            # Preempted: the checkpoint is written and the process is exiting. A signal now
            # (torchrun stops the other workers with SIGTERM once one has exited) must not cut
            # the record's last write or the exit code short: ignore it. SIG_IGN, not our
            # handler: Python puts its own handlers back to SIG_DFL as the interpreter ends.
            self._restore.detach()
            for number in self.flag.previous:
                signal.signal(number, signal.SIG_IGN)
        else:
            self._restore()
