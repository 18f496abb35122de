"""``console.log``: a copy of everything the process prints to stdout and stderr.

``sys.stdout`` / ``sys.stderr`` are wrapped so each write goes to the terminal as before and
to the file (line-buffered, so a killed process loses at most a partial line). Output written
straight to file descriptors 1/2 by C code or child processes is not copied, nor is what a
forked child (a DataLoader worker) prints: see :meth:`ConsoleTee.abandon`. If the copy cannot
be written (a full disk), copying stops with one warning line and printing goes on: the
program's own output never fails because of its copy.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from pathlib import Path
from typing import Any, TextIO

__all__ = ["ConsoleTee"]


class _TeeStream:
    def __init__(self, stream: TextIO, copy: TextIO, lock: threading.Lock, errors: TextIO) -> None:
        self._stream = stream
        self._copy = copy
        self._lock = lock
        self._errors = errors  # the original stderr, for the one warning

    def write(self, text: str) -> int:
        n = self._stream.write(text)
        failed = None
        with self._lock:
            if not self._copy.closed:
                try:
                    self._copy.write(text)
                except OSError as exc:
                    failed = exc
                    with contextlib.suppress(OSError):
                        self._copy.close()  # closing flushes, and may fail the same way
        if failed is not None:
            self._errors.write(
                f"stoker: warning: console output could not be copied to {self._copy.name} "
                f"({failed.strerror or failed}); it is no longer copied\n"
            )
        return n

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, encoding, buffer, ...
        return getattr(self._stream, name)


class ConsoleTee:
    """Copy ``sys.stdout`` and ``sys.stderr`` into ``path`` until :meth:`close`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file = open(self.path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        self._lock = threading.Lock()
        self._saved = (sys.stdout, sys.stderr)
        self._out = _TeeStream(sys.stdout, self._file, self._lock, sys.stderr)
        self._err = _TeeStream(sys.stderr, self._file, self._lock, sys.stderr)
        sys.stdout = self._out
        sys.stderr = self._err

    def abandon(self) -> None:
        """In a forked child: stop copying, and never write into the parent's file.

        The child's copy of the file object may hold the parent's unflushed partial line; its
        descriptor is pointed at ``/dev/null`` so that a flush at the child's exit goes nowhere.
        """
        if sys.stdout is self._out:
            sys.stdout = self._saved[0]
        if sys.stderr is self._err:
            sys.stderr = self._saved[1]
        if not self._file.closed:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self._file.fileno())
            os.close(null)

    def close(self) -> None:
        """Stop copying (restores the streams if nobody replaced them since). Idempotent."""
        if sys.stdout is self._out:
            sys.stdout = self._saved[0]
        if sys.stderr is self._err:
            sys.stderr = self._saved[1]
        with self._lock, contextlib.suppress(OSError):  # a full disk: warned at the write
            if not self._file.closed:
                self._file.close()
