"""``record.json``: everything needed to know, later, what produced a run.

Fields (``schema`` 1)::

    id, name, status ("running" | "finished" | "failed" | "killed" | "preempted"), error (type,
    message, traceback) when failed or killed, preempted (signal, step) when preempted,
    checkpoint_seconds (step, seconds: the last complete save's time, final or preemption),
    command: argv, orig_argv (with the interpreter's own flags), executable, cwd, script,
             script_args, launcher (the ``stoker run`` command line, when launched by it)
    config (the user's: dataclass, dict or argparse Namespace), settings (stoker's), seeds,
    git: repo, revision, branch, dirty, patch ("code.patch" when dirty), untracked files
         included / skipped (too large),
    packages {name: version}, versions (python, torch, cuda, cudnn, stoker),
    host (hostname, platform, cpu, cpu_count, gpus, ...), world_size,
    pid, pid_start (to tell a dead process from a reused pid), started, ended, heartbeat
    (UTC ISO times), attempts (one entry per start: elastic restarts, resumes),
    summary: steps (last logged step), last (the last value of each metric)

The file is replaced atomically (write beside, rename) each time it is updated: a write that
fails (a full disk, a permission) leaves the previous record whole, and no temporary file.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import enum
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stoker import safe_files
from stoker.errors import StokerError

__all__ = [
    "ENDED",
    "RECORD",
    "SCHEMA",
    "STATUSES",
    "jsonable",
    "now_iso",
    "pid_start_time",
    "read_record",
    "write_record",
]

RECORD = "record.json"
PATCH = "code.patch"
METRICS = "metrics.jsonl"
CONSOLE = "console.log"
SCHEMA = 1
RECORD_LIMIT = 16 << 20  # bytes; a record is a few KB (its traceback is capped at 20 KB)
ENDED = ("finished", "failed", "killed", "preempted")
"""The statuses of a run that ended; ``preempted``: a signal stopped it after its checkpoint
(``record["preempted"]`` says which signal, at which step)."""
STATUSES = ("running", *ENDED)


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def jsonable(obj: Any, _depth: int = 0) -> Any:
    """A JSON-ready copy of a user config: dataclasses, Namespaces, dicts, paths, enums...;
    anything else becomes its ``repr`` (a record must never fail on an odd config value)."""
    if _depth > 20:
        return repr(obj)
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else repr(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name), _depth + 1) for f in dataclasses.fields(obj)}
    if isinstance(obj, argparse.Namespace):
        return {k: jsonable(v, _depth + 1) for k, v in sorted(vars(obj).items())}
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v, _depth + 1) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        items = sorted(obj, key=repr) if isinstance(obj, set | frozenset) else obj
        return [jsonable(v, _depth + 1) for v in items]
    if isinstance(obj, enum.Enum):
        return jsonable(obj.value, _depth + 1)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    item = getattr(obj, "item", None)  # numpy / torch scalars
    if callable(item) and getattr(obj, "ndim", None) == 0:
        return jsonable(item(), _depth + 1)
    return repr(obj)


def pid_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to detect pid reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22; the command name (field 2) may contain spaces, so split after its ')'.
    fields = stat.rpartition(")")[2].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def write_record(run_dir: Path, record: Mapping[str, Any], *, durable: bool = False) -> None:
    """Replace ``run_dir/record.json`` atomically (fsync too when ``durable``)."""
    path = run_dir / RECORD
    tmp = run_dir / f".{RECORD}.{os.getpid()}.tmp"
    data = json.dumps(record, indent=1, default=repr) + "\n"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


# The JSON type of each field a reader uses (see the module docstring); a nested dict is the
# shape of an object, ``[t]`` a list of ``t``. Any field may be absent or null (older records,
# a run still starting); ``config``, ``settings``, ``seeds`` are the user's, of any shape.
_SHAPE: dict[str, Any] = {
    "schema": int,
    "id": str,
    "name": str,
    "status": str,
    "error": {"type": str, "message": str, "traceback": str},
    "command": {
        "argv": [str],
        "orig_argv": [str],
        "executable": str,
        "cwd": str,
        "script": str,
        "script_args": [str],
        "launcher": str,
    },
    "git": {
        "repo": str,
        "revision": str,
        "branch": str,
        "dirty": bool,
        "patch": str,
        "untracked_included": list,
        "untracked_skipped": list,
    },
    "packages": dict,
    "versions": dict,
    "host": {"hostname": str, "gpus": [dict]},
    "world_size": int,
    "pid": int,
    "pid_start": int,
    "started": str,
    "ended": str,
    "heartbeat": str,
    "heartbeat_seconds": (int, float),
    "attempts": [dict],
    "summary": {"steps": int, "last": dict, "lines": int, "lines_lost": int, "metrics_error": str},
    "resumed_from": dict,
}
_NAMES = {dict: "an object", list: "an array", str: "a string", bool: "true/false"}


def _name(t: type) -> str:
    return _NAMES.get(t, "a number" if t in (int, float) else t.__name__)


def _types(shape: Any) -> tuple[type, ...]:
    if isinstance(shape, dict):
        return (dict,)
    if isinstance(shape, list):
        return (list,)
    return shape if isinstance(shape, tuple) else (shape,)


def _wrong(value: Any, shape: Any) -> str | None:
    """What is wrong with the type of ``value`` for ``shape`` (None: nothing; null is fine)."""
    wanted = _types(shape)
    if value is None or (
        isinstance(value, wanted) and (bool in wanted or not isinstance(value, bool))
    ):
        return None
    shown = json.dumps(value, default=repr)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    names = " or ".join(dict.fromkeys(_name(t) for t in wanted))
    return f"is {_name(type(value))} ({shown}) where {names} belongs"


def _check(value: Any, shape: Any, name: str, path: Path) -> None:
    problem = _wrong(value, shape)
    if problem is not None:
        raise StokerError(
            f"{path}: {name} {problem}; it is not a record stoker wrote (restore it, or remove "
            "the run directory)"
        )
    if isinstance(shape, dict) and value is not None:
        for key, sub in shape.items():
            _check(value.get(key), sub, f"{name}.{key}", path)
    elif isinstance(shape, list) and value is not None:
        for i, item in enumerate(value):
            _check(item, shape[0], f"{name}[{i}]", path)


def read_record(run_dir: Path, *, root: Path | None = None) -> dict[str, Any]:
    """The parsed ``record.json`` of ``run_dir``; raises OSError if it cannot be opened, and
    :class:`~stoker.errors.StokerError` (a ValueError) in one line if it is not a regular file
    of at most 16 MiB holding a JSON object whose fields have the types stoker writes (a
    ``"started": 12345`` is refused here, not met as a TypeError by every reader), or (with
    ``root``) resolves outside ``root``."""
    path = Path(run_dir) / RECORD
    record = safe_files.read_json(path, expect=dict, limit=RECORD_LIMIT, root=root)
    for name, shape in _SHAPE.items():
        _check(record.get(name), shape, name, path)
    return record
