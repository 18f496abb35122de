"""A recorded run: its directory, ``record.json``, ``metrics.jsonl``, ``console.log``.

    run = start_run(RecordConfig(name="mlm"), user_config=args, seeds={"torch": 0})
    for step in ...:
        run.log({"loss": loss}, step=step)      # no host sync, returns in microseconds
    run.finish()                                  # or let the process exit: see below

Only the main rank writes (``rank=0``); other ranks get a disabled run whose ``log`` does
nothing but whose ``dir`` is the shared one (for checkpoints).

The final status is written without the user asking: ``finished`` at a normal exit (atexit),
``failed`` with the exception when one escapes (:func:`stoker.errors.on_failure`) or the
``with`` block, ``killed`` on SIGTERM (torchrun's way of stopping workers) or Ctrl-C, unless
a :class:`~stoker.Stoker` handles those signals (the default, see
:mod:`stoker.runtime.preemption`): then ``preempted``, with the signal and the step. A
SIGKILLed process writes nothing; ``stoker runs`` infers ``killed`` when the status still says
running but the process is gone (same host) or the heartbeat is stale (another host).

One process at a time may write a run directory: a second live process given the same one is
refused in one line (see :func:`stoker.records.rundir.claim`).

Only the process that started the run writes: a forked child (a DataLoader worker) inherits
the :class:`Run` with its hooks and open files, and from the fork on its copy does nothing
(its prints are not copied into ``console.log`` either).

Everything slow happens at start (git, package list: ~0.1–1 s) or on the background thread
(metrics, heartbeat every ``heartbeat_seconds``); the training thread only queues.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import os
import signal
import socket
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stoker.errors import Preempted, StokerError, on_failure
from stoker.records import environment
from stoker.records import git as _git
from stoker.records.console import ConsoleTee
from stoker.records.metrics import MetricsLogger
from stoker.records.record import (
    CONSOLE,
    ENDED,
    METRICS,
    PATCH,
    RECORD,
    SCHEMA,
    jsonable,
    now_iso,
    pid_start_time,
    read_record,
    write_record,
)
from stoker.records.rundir import Claim, cannot_create, claim, resolve_run_dir
from stoker.records.trackers import Tracker, TrackerFeed

__all__ = ["RecordConfig", "Run", "start_run"]

LAUNCH_COMMAND_ENV = "STOKER_LAUNCH_COMMAND"


@dataclass(kw_only=True, slots=True)
class RecordConfig:
    """Where and what to record."""

    name: str | None = None
    """Run name (default: the script's file name without ``.py``)."""
    root: str | Path | None = None
    """Directory of run directories (default ``$STOKER_RUNS_DIR`` or ``./runs``)."""
    directory: str | Path | None = None
    """Exact run directory (default ``$STOKER_RUN_DIR`` or ``<root>/<UTC time>-<name>``)."""
    tee_console: bool = True
    """Copy stdout/stderr into ``console.log``."""
    save_code: bool = True
    """Record the git state and write uncommitted changes to ``code.patch``."""
    max_untracked_bytes: int = 1_000_000
    """Untracked files larger than this are listed, not included in the patch."""
    flush_seconds: float = 0.1
    """How often the background thread writes metrics (the most a SIGKILL loses of them)."""
    heartbeat_seconds: float = 30.0
    """How often ``record.json`` is refreshed (heartbeat, steps, last metrics)."""

    def __post_init__(self) -> None:
        if not self.flush_seconds > 0 or not self.heartbeat_seconds > 0:
            raise StokerError(
                f"flush_seconds={self.flush_seconds}, heartbeat_seconds="
                f"{self.heartbeat_seconds}; both must be positive numbers of seconds"
            )
        if self.max_untracked_bytes < 0:
            raise StokerError(f"max_untracked_bytes={self.max_untracked_bytes} is negative")


def _message(error: BaseException) -> str:
    if isinstance(error, KeyboardInterrupt):
        return str(error) or "interrupted: KeyboardInterrupt (Ctrl-C or SIGINT)"
    if isinstance(error, SystemExit):
        return f"sys.exit({error.code!r})"
    return str(error) or type(error).__name__


def _script() -> Path | None:
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None) or (sys.argv[0] if sys.argv else None)
    if not path or path in ("-c", "-m"):
        return None
    p = Path(path)
    return p.resolve() if p.is_file() else None


def _command(script: Path | None) -> dict[str, Any]:
    return {
        "argv": list(sys.argv),
        "orig_argv": list(getattr(sys, "orig_argv", sys.argv)),
        "executable": sys.executable,
        "cwd": os.getcwd(),
        "script": str(script) if script else None,
        "script_args": list(sys.argv[1:]),
        "launcher": os.environ.get(LAUNCH_COMMAND_ENV),
    }


_LIVE: weakref.WeakSet[Run] = weakref.WeakSet()  # runs to disarm in a forked child
_fork_hook_registered = False  # os.register_at_fork cannot be undone: register once


def _disarm_in_child() -> None:
    for run in list(_LIVE):
        run._forked()


def _watch_forks(run: Run) -> None:
    global _fork_hook_registered
    _LIVE.add(run)
    if not _fork_hook_registered and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_disarm_in_child)
        _fork_hook_registered = True


class Run:
    """A run being recorded. Create with :func:`start_run`."""

    def __init__(
        self,
        run_dir: Path,
        record: dict[str, Any] | None,
        config: RecordConfig,
        claimed: Claim | None = None,
    ) -> None:
        self.dir = run_dir
        self.id = run_dir.name
        self.config = config
        self.enabled = record is not None
        self.record: dict[str, Any] = record or {}
        self._lock = threading.Lock()
        self._last_beat = time.monotonic()
        self._metrics: MetricsLogger | None = None
        self._tee: ConsoleTee | None = None
        self._forget_failure_listener: Callable[[], None] | None = None
        self._previous_sigterm: Any = None
        self._done = False
        self._claim = claimed  # released once the final record is written
        self._write_warned = False
        self._pid = os.getpid()
        self._summaries: dict[str, Any] = {}
        self._trackers: TrackerFeed | None = None
        if not self.enabled:
            return
        _watch_forks(self)
        self._metrics = MetricsLogger(
            run_dir / METRICS, flush_seconds=config.flush_seconds, on_tick=self._tick
        )
        if config.tee_console:
            self._tee = ConsoleTee(run_dir / CONSOLE)
        self._install_hooks()

    # -- logging -------------------------------------------------------------------------
    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Append ``metrics`` for ``step`` to ``metrics.jsonl`` (queued; tensors stay async)."""
        if self._metrics is not None and not self._done:
            self._metrics.log(metrics, step)

    def log_later(self, compute: Callable[[], Mapping[str, Any]], step: int | None) -> None:
        """A line whose metrics ``compute()`` returns on the writer thread (the meters')."""
        if self._metrics is not None and not self._done:
            self._metrics.log_later(compute, step)

    def flush_metrics(self) -> None:
        """Write every metric queued so far, now, on the calling thread. It waits for the
        device values among them (a host-device sync): for a checkpoint, which waits for the
        device anyway, never for every step."""
        if self._metrics is not None and not self._done and os.getpid() == self._pid:
            self._metrics.flush()

    def add_trackers(self, trackers: list[Tracker]) -> None:
        """Send every metrics line, the config and the record to ``trackers`` too (from the
        metrics writer's thread; see :mod:`stoker.records.trackers`)."""
        if self._metrics is None or not trackers:
            return
        self._trackers = TrackerFeed(trackers, self.dir, self._record_copy)
        self._metrics.sinks.append(self._trackers)

    def _record_copy(self) -> dict[str, Any]:
        with self._lock:  # the training thread may be updating it
            return copy.deepcopy(self.record)

    def add_summary(self, key: str, value: Any) -> None:
        """Keep ``value`` as ``summary[key]`` of ``record.json`` (e.g. the meters' summary);
        written with the next heartbeat and the final status."""
        with self._lock:
            self._summaries[key] = jsonable(value)

    def update(self, **fields: Any) -> None:
        """Add or replace top-level fields of ``record.json`` (e.g. ``seeds=...``)."""
        if not self.enabled or os.getpid() != self._pid:
            return
        with self._lock:
            for key, value in fields.items():
                self.record[key] = jsonable(value)
            self._write("the new fields")

    # -- status --------------------------------------------------------------------------
    def _summary(self) -> dict[str, Any]:
        m = self._metrics
        if m is None:
            return {}
        return {
            "steps": m.last_step,
            "last": jsonable(dict(m.last)),
            "lines": m.lines,
            "lines_lost": m.lost,  # > 0, or metrics_error set: metrics.jsonl is incomplete
            "metrics_error": m.error,
            **self._summaries,
        }

    def _tick(self) -> None:
        if time.monotonic() - self._last_beat < self.config.heartbeat_seconds:
            return
        self._last_beat = time.monotonic()
        with self._lock:
            if self._done:
                return
            self.record["heartbeat"] = now_iso()
            self.record["summary"] = self._summary()
            self._write("the heartbeat")

    def finish(self, status: str = "finished", error: BaseException | str | None = None) -> None:
        """Write the final status (``finished``/``failed``/``killed``/``preempted``) and close
        the files. ``preempted`` with a :class:`~stoker.errors.Preempted` records its signal
        and step as ``preempted``, not as an error."""
        if not self.enabled or self._done or os.getpid() != self._pid:
            return
        if status not in ENDED:
            raise StokerError(f"finish(status={status!r}); use one of {', '.join(ENDED)}")
        self._done = True
        self._uninstall_hooks()
        if self._metrics is not None:
            with contextlib.suppress(OSError):
                self._metrics.close()
        if self._tee is not None:
            self._tee.close()
        with self._lock:
            self.record["status"] = status
            self.record["ended"] = now_iso()
            self.record["heartbeat"] = self.record["ended"]
            self.record["summary"] = self._summary()
            if isinstance(error, Preempted):
                self.record["preempted"] = {"signal": error.signal_name, "step": error.step}
            elif isinstance(error, BaseException):
                tb = "".join(traceback.format_exception(type(error), error, error.__traceback__))
                self.record["error"] = {
                    "type": type(error).__name__,
                    "message": _message(error),
                    "traceback": tb[-20000:],
                }
            elif error is not None:
                self.record["error"] = {"type": None, "message": str(error), "traceback": None}
            self._write(f"the final status {status!r}", final=True)
        if self._trackers is not None:  # (outside the lock: a tracker starting reads the record)
            self._trackers.finish(self._record_copy())
        if self._claim is not None:
            self._claim.release()

    def _write(self, what: str, *, final: bool = False) -> None:
        """Write ``record.json``; a failure (a full disk) is one warning line, not an error:
        the record stays in memory and the next write (heartbeat, finish) tries again. Only the
        first failed update warns; the final one always does, since nothing comes after it."""
        try:
            write_record(self.dir, self.record, durable=final)
        except OSError as exc:
            if self._write_warned and not final:
                return
            self._write_warned = True
            then = (
                "; it keeps its previous content (status 'running': `stoker runs` shows the run "
                "as killed?)"
                if final
                else "; later updates try again"
            )
            print(
                f"stoker: warning: could not write {self.dir / RECORD} ({what}): "
                f"{exc.strerror or exc}{then}",
                file=sys.stderr,
            )

    def _forked(self) -> None:
        """In a forked child: the run belongs to the parent; write nothing from here on."""
        self._done = True
        if self._metrics is not None:
            self._metrics.abandon()
        if self._tee is not None:
            self._tee.abandon()

    def __enter__(self) -> Run:
        return self

    def end(self, error: BaseException | None = None) -> None:
        """Finish with the status ``error`` means: none (or ``SystemExit(0)``) ``finished``,
        :class:`~stoker.errors.Preempted` ``preempted``, ``KeyboardInterrupt`` (Ctrl-C,
        SIGINT) ``killed``, anything else ``failed``."""
        if error is None or (isinstance(error, SystemExit) and error.code in (0, None)):
            self.finish("finished")
        elif isinstance(error, Preempted):
            self.finish("preempted", error)
        elif isinstance(error, KeyboardInterrupt):
            self.finish("killed", error)
        else:
            self.finish("failed", error)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> None:
        self.end(exc)

    # -- hooks ---------------------------------------------------------------------------
    def _install_hooks(self) -> None:
        self._forget_failure_listener = on_failure(self.end)
        atexit.register(self._at_exit)
        if threading.current_thread() is threading.main_thread():
            current = signal.getsignal(signal.SIGTERM)
            if current in (signal.SIG_DFL, None):
                self._previous_sigterm = current
                signal.signal(signal.SIGTERM, self._on_sigterm)

    def _uninstall_hooks(self) -> None:
        if self._forget_failure_listener is not None:
            self._forget_failure_listener()
        atexit.unregister(self._at_exit)
        if (
            self._previous_sigterm is not None
            and threading.current_thread() is threading.main_thread()
        ) and signal.getsignal(signal.SIGTERM) == self._on_sigterm:
            signal.signal(signal.SIGTERM, self._previous_sigterm)

    def _at_exit(self) -> None:
        self.finish("finished")

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        # In a forked child finish() does nothing: the child just dies of the signal.
        self.finish("killed", "terminated by SIGTERM")
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


def start_run(
    config: RecordConfig | None = None,
    *,
    user_config: Any = None,
    settings: Mapping[str, Any] | None = None,
    seeds: Any = None,
    rank: int = 0,
    world_size: int = 1,
) -> Run:
    """Create (or, given an existing directory, continue) a run and write its record.

    ``user_config``: the user's configuration (a dataclass, dict or argparse Namespace).
    ``settings``: stoker's own resolved settings (device, precision, ...). ``seeds``: the seeds
    used. Every rank calls it; only ``rank`` 0 writes.
    """
    config = config or RecordConfig()
    script = _script()
    name = config.name or (script.stem if script else "run")
    run_dir = resolve_run_dir(name, directory=config.directory, root=config.root)
    if rank != 0:
        return Run(run_dir, None, config)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise cannot_create(run_dir, exc, directory=config.directory) from None
    # Before reading or writing anything. (If the rest fails, the claim lasts until this
    # process exits: this process may still claim it again, no other can use a half-made run.)
    claimed = claim(run_dir, directory=config.directory)
    started = now_iso()
    attempt = {
        "started": started,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "argv": list(sys.argv),
    }
    previous: dict[str, Any] | None = None
    if (run_dir / RECORD).exists():
        try:
            previous = read_record(run_dir)
        except (OSError, ValueError):
            previous = None
    if previous is not None:
        # A restart (elastic, or resume="auto" into the same directory): same run, new attempt,
        # recorded with this attempt's config, settings and world size (the runtime adds what
        # changed since the checkpoint it resumed from, see RunServices.attach).
        record = previous
        record.setdefault("attempts", []).append(attempt)
        record.update(status="running", ended=None, error=None, world_size=world_size)
        record.update(config=jsonable(user_config), settings=jsonable(settings))
    else:
        git_state = None
        if config.save_code:
            start = script.parent if script else Path.cwd()
            try:
                git_state = _git.capture(
                    start,
                    max_untracked_bytes=config.max_untracked_bytes,
                    exclude=(run_dir.parent,),
                )
            except _git.GitError:
                git_state = None
        patch_file = None
        if git_state is not None and git_state.patch:
            (run_dir / PATCH).write_text(
                git_state.patch, encoding="utf-8", errors="surrogateescape"
            )
            patch_file = PATCH
        record = {
            "schema": SCHEMA,
            "id": run_dir.name,
            "name": name,
            "status": "running",
            "error": None,
            "command": _command(script),
            "config": jsonable(user_config),
            "settings": jsonable(settings),
            "seeds": jsonable(seeds),
            "git": git_state.to_record(patch_file) if git_state else None,
            "packages": environment.packages(),
            "versions": environment.versions(),
            "host": environment.hardware(),
            "world_size": world_size,
            "started": started,
            "ended": None,
            "attempts": [attempt],
            "summary": {},
        }
    record.update(
        pid=os.getpid(),
        pid_start=pid_start_time(os.getpid()),
        heartbeat=started,
        heartbeat_seconds=config.heartbeat_seconds,
    )
    record["host"]["hostname"] = socket.gethostname()
    write_record(run_dir, record, durable=True)
    return Run(run_dir, record, config, claimed)
