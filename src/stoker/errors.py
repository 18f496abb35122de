"""The one exception type stoker raises for bad input or a bad environment.

A :class:`StokerError` carries a complete, single-line message: what happened, with the actual
values, and what to do. The ``stoker`` CLI prints it as one line without a traceback, and so
does a script that created a :class:`~stoker.Stoker` (see :func:`install_excepthook`).
"""

from __future__ import annotations

import sys
import types

__all__ = ["StokerError", "install_excepthook"]


class StokerError(ValueError):
    """Bad input or an environment that cannot do what was asked; the message says what to do."""


def _one_line_hook(
    previous: types.FunctionType | object,
) -> object:
    def hook(
        exc_type: type[BaseException],
        exc: BaseException,
        tb: types.TracebackType | None,
    ) -> None:
        if issubclass(exc_type, StokerError):
            print(f"stoker: error: {exc}", file=sys.stderr)
            return
        previous(exc_type, exc, tb)  # type: ignore[operator]

    hook._stoker = True  # type: ignore[attr-defined]
    return hook


def install_excepthook() -> None:
    """Print an uncaught :class:`StokerError` as one line instead of a traceback.

    Called when a :class:`~stoker.Stoker` is created (never at import). Other exceptions still
    reach the previous hook untouched. Idempotent.
    """
    if getattr(sys.excepthook, "_stoker", False):
        return
    sys.excepthook = _one_line_hook(sys.excepthook)  # type: ignore[assignment]
