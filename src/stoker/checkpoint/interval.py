"""How often to checkpoint, from measurement: the Young–Daly interval.

Checkpointing every ``T`` seconds of compute costs a save of ``C`` seconds per interval, and a
failure (one every ``M`` seconds on average) loses on average half an interval of work. Young
(1974) minimised the sum to ``T = sqrt(2 C M)``; Daly (2006) added the higher-order terms used
here, which matter when ``C`` is not small against ``M``::

    T = sqrt(2 C M) * (1 + sqrt(C / 2M) / 3 + (C / 2M) / 9) - C     (C < 2M; else T = M)

and the expected fraction of wall-clock time lost is about ``C / (T + C) + (T + C) / 2M``
(saves, plus re-done work; a restart's own cost adds ``R / M``).

:class:`AutoInterval` turns that into a number of steps during a run: it takes the blocking
time of each save (with ``async_save``, the copy the loop waits for) and the step time
between saves, both measured, and sets the next save's step from them — so the interval adapts
when the save cost or the step time changes.
"""

from __future__ import annotations

import logging
import math
import time

from stoker.errors import StokerError

__all__ = ["AutoInterval", "daly_interval", "expected_loss"]

log = logging.getLogger(__name__)

FIRST_SAVE_STEP = 10
"""With ``every="auto"`` the first save comes at this step: it measures the save cost (and
the steps before it, the step time) that every later interval is computed from."""


def daly_interval(save_seconds: float, mtbf_seconds: float) -> float:
    """Seconds of compute between checkpoints that minimise expected lost time (Daly 2006).

    >>> round(daly_interval(10.0, 3600.0))  # a 10 s save, a failure an hour on average
    262
    """
    if not save_seconds >= 0 or not mtbf_seconds > 0:
        raise StokerError(
            f"daly_interval needs save_seconds >= 0 and mtbf_seconds > 0; got {save_seconds}, "
            f"{mtbf_seconds}"
        )
    if save_seconds >= 2 * mtbf_seconds:
        return mtbf_seconds
    ratio = save_seconds / (2 * mtbf_seconds)
    young = math.sqrt(2 * save_seconds * mtbf_seconds)
    return max(0.0, young * (1 + math.sqrt(ratio) / 3 + ratio / 9) - save_seconds)


def expected_loss(
    interval_seconds: float, save_seconds: float, mtbf_seconds: float, restart_seconds: float = 0.0
) -> float:
    """First-order expected fraction of wall-clock time not spent on new work: the saves, the
    work redone after a failure (half a period on average) and the restarts."""
    period = interval_seconds + save_seconds
    return min(1.0, save_seconds / period + (period / 2 + restart_seconds) / mtbf_seconds)


class AutoInterval:
    """The step of the next save, re-planned after every save from measured costs.

    Call :meth:`saved` right after each save (with the time the loop was blocked by it); read
    :attr:`next_step` every step (an integer comparison, nothing else).
    """

    def __init__(self, mtbf_seconds: float, *, first_step: int = FIRST_SAVE_STEP) -> None:
        if not mtbf_seconds > 0:
            raise StokerError(f"mtbf={mtbf_seconds} s; give a positive mean time between failures")
        self.mtbf = mtbf_seconds
        self.next_step = first_step
        self.save_seconds: float | None = None
        """The latest save's blocking time."""
        self.step_seconds: float | None = None
        """Mean step time between the two latest saves (saves excluded)."""
        self.interval_steps: int | None = None
        self._since: tuple[int, float] | None = None  # (step, time) when the last save ended

    def started(self, step: int, now: float | None = None) -> None:
        """Where the run starts (0, or the step it resumed from): step times count from here."""
        self._since = (step, time.monotonic() if now is None else now)
        self.next_step = max(self.next_step, step + 1)

    def saved(self, step: int, blocked_seconds: float, now: float | None = None) -> int:
        """Plan the next save after a save at ``step`` that blocked the loop for
        ``blocked_seconds``; returns the new :attr:`next_step`."""
        now = time.monotonic() if now is None else now
        if self._since is not None and step > self._since[0]:
            start_step, start_time = self._since
            work = now - blocked_seconds - start_time
            self.step_seconds = max(work, 1e-9) / (step - start_step)
        self.save_seconds = blocked_seconds
        self._since = (step, now)
        if self.step_seconds is None:  # no step measured yet: try again a few steps on
            self.next_step = step + FIRST_SAVE_STEP
            return self.next_step
        seconds = daly_interval(blocked_seconds, self.mtbf)
        self.interval_steps = max(1, round(seconds / self.step_seconds))
        self.next_step = step + self.interval_steps
        loss = expected_loss(self.interval_steps * self.step_seconds, blocked_seconds, self.mtbf)
        log.info(
            "checkpoint interval: every %d steps (%.1f s of compute; a save blocks %.2f s, a "
            "step takes %.3f s, MTBF %.0f s): expected %.1f%% of the time lost to saves and "
            "failures",
            self.interval_steps,
            self.interval_steps * self.step_seconds,
            blocked_seconds,
            self.step_seconds,
            self.mtbf,
            100 * loss,
        )
        return self.next_step
