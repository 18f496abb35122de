"""How a :class:`~stoker.Stoker`'s run ends: once, in the process that created it, and saying
whether it failed.

A run is ended by :meth:`Stoker.close`, called by the user or by itself at interpreter exit.
Two facts decide what it does, and both are kept here rather than guessed from interpreter
state:

- *The process.* A DataLoader worker is a fork of the training process: it inherits the
  Stoker, the exit hook and the open run directory, and runs that hook when it exits (at the
  end of every epoch). Only the process that created the run may write its final checkpoint,
  finish its record or leave the process group; in any other process
  :meth:`Lifecycle.owns_process` is False and ``close`` does nothing. (The run record guards
  its own files the same way, see :class:`stoker.records.Run`.)
- *The failure.* An exception that ends the program reaches :attr:`Lifecycle.failure` through
  :func:`stoker.errors.on_failure` (stoker's excepthook, or ``stoker run``'s entry point);
  ``close(failed=exc)`` says the same explicitly. A failed run gets no final checkpoint and no
  doctor report, and its record says ``failed`` (``killed`` for Ctrl-C) with the error.
  ``sys.last_value`` is not consulted: a REPL keeps it for good, long after the error.
  A preemption (:class:`~stoker.errors.Preempted`, a ``SystemExit``: no excepthook sees it)
  is known to the run's services instead, and ``close`` ends the run ``preempted``, with the
  ranks' barrier but without a final checkpoint or doctor report (see
  :mod:`stoker.runtime.preemption`).

The exit hook holds the Stoker weakly, so a Stoker nobody references any more is collected
with its model instead of living until exit. If ``close`` fails there (a rank that never came
to the final barrier, a final checkpoint that could not be written), the hook prints the error
(one line for a :class:`~stoker.StokerError`) and ends the process with exit code 1: an
exception escaping an exit hook would only be printed as "ignored", the exit code would stay 0
and torchrun would take the failed worker for a finished one.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
import traceback
import weakref
from collections.abc import Callable

from stoker.errors import StokerError, on_failure

__all__ = ["Lifecycle"]


def _at_exit(callback: Callable[[], None]) -> None:
    """Run ``callback`` at interpreter exit, while thread pools still accept work.

    The final checkpoint hashes its files on a thread pool; ``atexit`` handlers run after
    ``concurrent.futures`` has shut its pools down, the hooks ``threading`` runs at shutdown
    run before (last registered, first run).
    """
    register = getattr(threading, "_register_atexit", None)
    try:
        if register is not None:
            register(callback)
            return
    except RuntimeError:  # already shutting down
        pass
    atexit.register(callback)


class Lifecycle:
    """The process a run belongs to, and the hook that closes it at exit.

    ``close`` is the owner's bound ``close`` method; it is held weakly.
    """

    def __init__(self, close: Callable[[], None]) -> None:
        self.pid = os.getpid()
        """The process that created the run (not a forked DataLoader worker)."""
        self.failure: BaseException | None = None
        """The exception that is ending the program, once one is."""
        self._close = weakref.WeakMethod(close)
        on_failure(self._on_failure)
        _at_exit(self._at_exit)

    def owns_process(self) -> bool:
        """True in the process that created the run; False in a forked child."""
        return os.getpid() == self.pid

    def _on_failure(self, exc: BaseException) -> None:
        if self.failure is None and self.owns_process():
            self.failure = exc

    def _at_exit(self) -> None:
        close = self._close()
        if close is None or not self.owns_process():
            return
        try:
            close()
        except BaseException as exc:
            if isinstance(exc, StokerError):
                print(f"stoker: error: {exc}", file=sys.stderr)
            else:
                traceback.print_exc()
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(1)
