"""The one exception type stoker raises for bad input or a bad environment, and how the program's
end by an exception is printed and reported.

A :class:`StokerError` carries a complete, single-line message: what happened, with the actual
values, and what to do. The ``stoker`` CLI prints it as one line without a traceback, and so
does a script that created a :class:`~stoker.Stoker` (see :func:`install_excepthook`).

What must know that the program is ending by an exception (a run record, to say ``failed``; a
``Stoker``, to skip its final checkpoint) registers with :func:`on_failure`. Listeners are
called by stoker's ``sys.excepthook`` before anything is printed, or by
:func:`report_failure` where the exception is caught before it gets there (``stoker run``'s
entry point): never by guessing from ``sys.last_value``, which the interpreter sets only in its
own hook and a REPL keeps for good.
"""

from __future__ import annotations

import contextlib
import sys
import types
import weakref
from collections.abc import Callable

__all__ = [
    "PREEMPTED_EXIT_CODE",
    "Preempted",
    "StokerError",
    "install_excepthook",
    "on_failure",
    "report_failure",
]


class StokerError(ValueError):
    """Bad input or an environment that cannot do what was asked; the message says what to do."""


PREEMPTED_EXIT_CODE = 143
"""The exit code of a run stopped by a preemption signal after saving its checkpoint: 128 +
SIGTERM, what a shell reports for a process ended by SIGTERM, so a scheduler (SLURM, Kubernetes)
and a job script read it as "terminated", not as the program's failure (1, or 2 for a
:class:`StokerError`). Requeue on it: ``[ $? -eq 143 ] && scontrol requeue $SLURM_JOB_ID``."""


class Preempted(SystemExit):
    """Ends a run that a signal preempted, once its checkpoint is written (see
    :mod:`stoker.runtime.preemption`): a ``SystemExit`` with :data:`PREEMPTED_EXIT_CODE`, so
    the process exits with that code wherever it is raised, and not a failure."""

    def __init__(self, signal_name: str, step: int) -> None:
        super().__init__(PREEMPTED_EXIT_CODE)
        self.signal_name = signal_name
        self.step = step

    def __str__(self) -> str:
        return f"preempted by {self.signal_name} at step {self.step}"


Listener = Callable[[BaseException], None]

_listeners: list[Callable[[], Listener | None]] = []  # each returns the listener, or None if gone
_one_line = False  # print a StokerError as one line (install_excepthook was called)
_last_reported: BaseException | None = None  # a chain of hooks reports each exception once


def report_failure(exc: BaseException) -> None:
    """Tell every :func:`on_failure` listener that ``exc`` is ending the program. Once per
    exception; a listener's own error is ignored (the original one matters)."""
    global _last_reported
    if exc is _last_reported:
        return
    _last_reported = exc
    for ref in list(_listeners):
        listener = ref()
        if listener is not None:
            with contextlib.suppress(Exception):
                listener(exc)


def on_failure(listener: Listener) -> Callable[[], None]:
    """Call ``listener(exc)`` when an exception ends the program; returns the unregister function.

    A bound method is held weakly (its object can still be collected). Installs stoker's
    ``sys.excepthook`` if it is not installed yet.
    """
    ref: Callable[[], Listener | None]
    if isinstance(listener, types.MethodType):
        ref = weakref.WeakMethod(listener)
    else:

        def ref() -> Listener | None:
            return listener

    _listeners[:] = [r for r in _listeners if r() is not None]
    _listeners.append(ref)
    _ensure_hook()

    def unregister() -> None:
        with contextlib.suppress(ValueError):
            _listeners.remove(ref)

    return unregister


def install_excepthook() -> None:
    """Print an uncaught :class:`StokerError` as one line instead of a traceback.

    Called when a :class:`~stoker.Stoker` is created (never at import). Other exceptions still
    reach the previous hook untouched; :func:`on_failure` listeners hear of both. Idempotent.
    """
    global _one_line
    _one_line = True
    _ensure_hook()


def _ensure_hook() -> None:
    if getattr(sys.excepthook, "_stoker", False):
        return
    previous = sys.excepthook

    def hook(
        exc_type: type[BaseException],
        exc: BaseException,
        tb: types.TracebackType | None,
    ) -> None:
        report_failure(exc)
        if _one_line and issubclass(exc_type, StokerError):
            print(f"stoker: error: {exc}", file=sys.stderr)
            return
        previous(exc_type, exc, tb)

    hook._stoker = True  # type: ignore[attr-defined]
    sys.excepthook = hook
