"""``metrics.jsonl``: one JSON object per ``log()`` call, written off the training thread.

    logger = MetricsLogger("runs/x/metrics.jsonl")
    logger.log({"loss": loss, "lr": lr}, step=step)   # loss may be a CUDA tensor: no sync
    logger.close()

Each line is ``{"step": 12, "time": 1718000000.123, "loss": 2.31, "lr": 0.001}`` (``time`` is
Unix seconds at the ``log`` call). ``log`` never makes the calling thread wait for a device:
a CUDA tensor is copied to pinned host memory with ``non_blocking=True`` and an event is
recorded behind the copy; a CPU tensor is cloned (its value is final, and the clone keeps a
later in-place update from changing what was logged). A background thread waits on the
events, converts to numbers and appends the lines every ``flush_seconds``; ``close()`` writes
the rest and fsyncs. A process killed mid-write leaves at most one partial last line, which
readers skip.

What a SIGKILL loses: the lines still queued, at most the last ``flush_seconds`` (default
0.1 s; each flush is one ``write()`` into the OS, which outlives the process, without fsync) —
provided the writer thread gets the GIL: a training step spends its time in torch kernels, which
release it, but a loop that runs pure Python for seconds can delay the writer (a 1 ms
pure-Python spin per step once held it off for 1.5 s).
Measured with ~1.6 ms steps: 0.05 s (28 steps) lost at 0.1 s, 1.0 s (619 steps) at the old
default of 1 s; the flush interval costs the training thread nothing measurable (the same
lines are formatted either way, on this thread). A run with checkpoints loses nothing for
good: each save first writes every queued line (:meth:`stoker.records.Run.flush_metrics`),
and a resumed run logs the steps after its checkpoint again.

A write that fails (a full disk, a quota, an I/O error) does not stop training: the lines of
that flush are dropped and counted in :attr:`MetricsLogger.lost`, the first error is kept in
:attr:`MetricsLogger.error` (the run record says both) and printed once as one warning line.
Later flushes try again, so lines logged after space is freed are written.
"""

from __future__ import annotations

import collections
import errno
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from stoker import safe_files
from stoker.errors import StokerError

__all__ = ["MACHINE_METRICS", "MetricsLogger", "read_metrics"]

_RESERVED = ("step", "time")
_log = logging.getLogger(__name__)

MACHINE_METRICS = frozenset(
    {
        "step_s_p50",
        "step_s_p99",
        "tokens_per_s",
        "samples_per_s",
        "data_wait_share",
        "flops_per_s",
        "mfu",
        "peak_memory_mb",
    }
)
"""What the meters (:mod:`stoker.meters.live`) log: measurements of the machine (speed,
memory), not of the model, so they differ between any two runs of the same code;
``stoker reproduce`` leaves them out of its comparison."""


class _Pending:
    """A device value on its way to the host: the copy and the event that says it landed."""

    __slots__ = ("event", "tensor")

    def __init__(self, tensor: torch.Tensor, event: Any) -> None:
        self.tensor = tensor
        self.event = event

    def resolve(self) -> Any:
        if self.event is not None:
            self.event.synchronize()  # on the logger's thread, never the training loop's
        t = self.tensor
        return t.item() if t.numel() == 1 else t.tolist()


def _capture(value: torch.Tensor) -> _Pending:
    t = value.detach()
    if t.device.type == "cuda":
        host = t.to("cpu", non_blocking=True)  # into pinned memory: an async copy
        event = torch.cuda.Event()
        event.record()
        return _Pending(host, event)
    if t.device.type == "cpu":
        return _Pending(t.clone(), None)
    return _Pending(t, None)  # other devices: read on the logger thread


def _items(metrics: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """``metrics`` checked, device values on their way to the host."""
    items: list[tuple[str, Any]] = []
    for key, value in metrics.items():
        if key in _RESERVED:
            raise StokerError(
                f"log(): {key!r} is a reserved field of metrics.jsonl; pass the step as "
                "log(metrics, step=...) and rename the metric"
            )
        if isinstance(value, torch.Tensor):
            items.append((key, _capture(value)))
        elif value is None or isinstance(value, int | float | str | bool):
            items.append((key, value))
        elif callable(getattr(value, "item", None)):  # numpy scalars
            items.append((key, value.item()))
        else:
            raise StokerError(
                f"log(): metric {key!r} is a {type(value).__name__}; log numbers, strings "
                "or tensors"
            )
    return items


class MetricsLogger:
    """Appends metric lines to ``path`` from a background thread."""

    def __init__(
        self,
        path: str | Path,
        *,
        flush_seconds: float = 0.1,
        on_tick: Callable[[], None] | None = None,
    ) -> None:
        if not flush_seconds > 0:
            raise StokerError(f"flush_seconds={flush_seconds}; use a positive number of seconds")
        self.path = Path(path)
        self.flush_seconds = flush_seconds
        self._on_tick = on_tick
        self._queue: collections.deque[
            tuple[int | None, float, list[tuple[str, Any]] | Callable[[], Mapping[str, Any]]]
        ] = collections.deque()
        self._wake = threading.Event()
        self._closed = False
        self._lock = threading.Lock()  # one writer at a time: the thread, or close()
        self.last_step: int | None = None
        """The largest step written so far."""
        self.last: dict[str, Any] = {}
        """The newest written value of each metric."""
        self.lines = 0
        self.sinks: list[Callable[[dict[str, Any]], None]] = []
        """Called with each line once it is resolved and written, on the writing thread (the
        trackers, see :mod:`stoker.records.trackers`)."""
        self.lost = 0
        """Lines that could not be written (a full disk): dropped, not retried."""
        self.error: str | None = None
        """The first write error, if any: the file is missing :attr:`lost` lines."""
        self._torn = False  # a failed write may have left a partial line at the end
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Unbuffered: each flush is one write() straight to the OS, so nothing of a failed
        # write lingers in a Python buffer to be written twice, or later out of order.
        self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115 (closed in close())
        self._thread = threading.Thread(target=self._run, name="stoker-metrics", daemon=True)
        self._thread.start()

    # -- the hot path ------------------------------------------------------------------------
    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Queue ``metrics`` (numbers, strings, tensors of any device) for ``step``."""
        if self._closed:
            raise StokerError(f"log() after close() of the metrics logger for {self.path}")
        self._queue.append((step, time.time(), _items(metrics)))

    def log_later(self, compute: Callable[[], Mapping[str, Any]], step: int | None) -> None:
        """Queue a line whose metrics ``compute()`` returns on the writing thread (the meters'
        window statistics: the training thread only hands over the raw numbers)."""
        if self._closed:
            raise StokerError(f"log() after close() of the metrics logger for {self.path}")
        self._queue.append((step, time.time(), compute))

    # -- the background thread -----------------------------------------------------------
    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self.flush_seconds)
            self._wake.clear()
            try:
                self.flush()
                if self._on_tick is not None:
                    self._on_tick()
            except Exception:  # never end the thread (a failed write is handled in _write)
                _log.exception("writing %s failed", self.path)

    def flush(self) -> None:
        """Resolve and write everything queued so far (called by the thread and close())."""
        with self._lock:
            if self._file.closed:
                return
            lines = []
            records = []
            while self._queue:
                step, stamp, items = self._queue.popleft()
                if callable(items):  # log_later(): computed here, off the training thread
                    try:
                        items = _items(items())
                    except Exception as exc:  # one bad line must not stop the others
                        _log.warning("a metrics line for step %s was not computed: %s", step, exc)
                        continue
                record: dict[str, Any] = {"step": step, "time": round(stamp, 3)}
                for key, value in items:
                    resolved = value.resolve() if isinstance(value, _Pending) else value
                    record[key] = resolved  # NaN/inf: json writes NaN/Infinity
                    self.last[key] = resolved
                if step is not None and (self.last_step is None or step > self.last_step):
                    self.last_step = step
                lines.append(json.dumps(record, default=repr) + "\n")
                records.append(record)
            if lines:
                self._write(lines)
            for sink in self.sinks:
                for record in records:
                    sink(record)

    def _write(self, lines: list[str]) -> None:
        # A partial line left by a failed write is ended first: it stays one unreadable
        # line (readers skip it) instead of swallowing the next one.
        data = ("\n" if self._torn else "") + "".join(lines)
        try:
            view = memoryview(data.encode("utf-8"))
            while view:  # write() may take part of the data
                view = view[self._file.write(view) or 0 :]
        except OSError as exc:
            self._torn = True
            self._failed(exc, len(lines))
            return
        self._torn = False
        self.lines += len(lines)

    def _failed(self, exc: OSError, lines: int) -> None:
        self.lost += lines
        if self.error is None:
            self.error = f"{exc.strerror or exc}"
            print(
                f"stoker: warning: metrics could not be written to {self.path} ({self.error}); "
                "training goes on, and the lines that cannot be written are dropped and counted "
                "(record.json: summary.lines_lost)",
                file=sys.stderr,
            )

    def close(self) -> None:
        """Write everything still queued, fsync, stop the thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        self._thread.join()
        self.flush()
        with self._lock:
            try:
                os.fsync(self._file.fileno())
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # EINVAL: a file that cannot be synced (a pipe)
                    self._failed(exc, 0)
            self._file.close()

    def abandon(self) -> None:
        """In a forked child: this process has no writer thread and must not write the file."""
        self._closed = True
        self._queue.clear()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All complete lines of a ``metrics.jsonl`` (a torn last line is skipped)."""
    out: list[dict[str, Any]] = []
    try:
        # A regular file (a FIFO or a symlink to a device is refused); any size.
        with safe_files.open_regular(path, limit=None) as f:
            text = f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out
