"""Trackers: TensorBoard and MLflow get what ``metrics.jsonl`` gets, off the training thread.

    Stoker(trackers=["tensorboard", "mlflow"])
    Stoker(trackers=[MLflowTracker(uri="http://mlflow.internal:5000")])

Each metrics line goes to the trackers from the metrics writer's thread, right after it is
resolved to numbers and written (:class:`~stoker.records.metrics.MetricsLogger`), so a tracker
never makes the loop wait; ``metrics.jsonl`` stays the source of truth: a tracker that fails
(a server down, a full disk) prints one warning line and is dropped, and the run goes on.

Offline by default: TensorBoard event files in ``<run>/tensorboard`` (``tensorboard --logdir
runs``), MLflow in a SQLite store ``<run>/mlflow.db`` (``mlflow ui --backend-store-uri
sqlite:///runs/<id>/mlflow.db``; MLflow 3 keeps its file store in maintenance mode behind an
environment switch, SQLite is its supported local store). What each receives: every numeric
metric at its step and time; the config and stoker's settings as parameters
(``config.lr``, ``settings.precision``); the run record's id, name, command, git revision and
host as tags (text in TensorBoard); at the end the status and the summary (the meters').

Both are optional dependencies: ``pip install 'stoker[tensorboard]'`` / ``'stoker[mlflow]'``;
a missing one is one error line when the Stoker is created, not an hour into the run. A new
tracker is a class with ``start`` / ``log`` / ``finish`` (:class:`Tracker`) in ``TRACKERS``.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from stoker.errors import StokerError

__all__ = ["TRACKERS", "MLflowTracker", "TensorBoardTracker", "Tracker", "TrackerFeed"]


class Tracker(Protocol):
    """A destination for a run's metrics. Every call comes from the metrics writer's thread
    (or the thread ending the run), one at a time.

    - ``start(run_dir, record)``: before the first metrics, with the run record so far.
    - ``log(step, stamp, metrics)``: one ``metrics.jsonl`` line: its step (None: not given),
      Unix time and numeric values.
    - ``finish(record)``: the run ended; ``record`` has its status and summary.
    """

    name: str

    def start(self, run_dir: Path, record: Mapping[str, Any]) -> None: ...

    def log(self, step: int | None, stamp: float, metrics: Mapping[str, float]) -> None: ...

    def finish(self, record: Mapping[str, Any]) -> None: ...


def _require(module: str, extra: str, what: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise StokerError(
            f"trackers=[{extra!r}] needs {what}, which is not installed; "
            f"pip install 'stoker[{extra}]' or drop {extra!r} from trackers"
        )


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``: nested config as flat string parameters."""
    if isinstance(value, Mapping):
        out: dict[str, str] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}{key}."))
        return out
    if not prefix:
        return {}
    text = value if isinstance(value, str) else json.dumps(value, default=repr)
    return {prefix[:-1]: text}


def _tags(record: Mapping[str, Any]) -> dict[str, str]:
    git = record.get("git") or {}
    command = record.get("command") or {}
    host = record.get("host") or {}
    tags = {
        "stoker.run_id": record.get("id"),
        "stoker.name": record.get("name"),
        "stoker.command": " ".join(command.get("argv") or []),
        "stoker.git_revision": git.get("revision") if isinstance(git, Mapping) else None,
        "stoker.git_dirty": git.get("dirty") if isinstance(git, Mapping) else None,
        "stoker.host": host.get("hostname") if isinstance(host, Mapping) else None,
        "stoker.started": record.get("started"),
    }
    return {k: str(v) for k, v in tags.items() if v is not None and v != ""}


def _params(record: Mapping[str, Any]) -> dict[str, str]:
    config = record.get("config")
    params = flatten(config if isinstance(config, Mapping) else {"value": config}, "config.")
    params.update(flatten(record.get("settings") or {}, "settings."))
    return params


class TensorBoardTracker:
    """TensorBoard event files in ``<run>/tensorboard`` (``torch.utils.tensorboard``)."""

    name = "tensorboard"

    def __init__(self, log_dir: str | Path | None = None) -> None:
        _require("tensorboard", "tensorboard", "TensorBoard")
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self._writer: Any = None

    def start(self, run_dir: Path, record: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = self.log_dir or run_dir / "tensorboard"
        self._writer = SummaryWriter(log_dir=str(self.log_dir))
        text = "\n".join(f"    {k} = {v}" for k, v in {**_params(record), **_tags(record)}.items())
        self._writer.add_text("run", text or "(nothing recorded)", 0)

    def log(self, step: int | None, stamp: float, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, step, walltime=stamp)

    def finish(self, record: Mapping[str, Any]) -> None:
        summary = flatten({"status": record.get("status"), "summary": record.get("summary")})
        self._writer.add_text("end", "\n".join(f"    {k} = {v}" for k, v in summary.items()), 0)
        self._writer.close()


_MLFLOW_KEY = re.compile(r"[^A-Za-z0-9_\-. /]")


class MLflowTracker:
    """An MLflow run: a SQLite store in the run directory, or the server at ``uri``."""

    name = "mlflow"

    def __init__(self, uri: str | None = None, *, experiment: str | None = None) -> None:
        _require("mlflow", "mlflow", "MLflow")
        self.uri = uri
        self.experiment = experiment
        self.run_id: str | None = None
        self._client: Any = None

    def start(self, run_dir: Path, record: Mapping[str, Any]) -> None:
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        self.uri = self.uri or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
        client = self._client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        name = self.experiment or str(record.get("name") or "stoker")
        found = client.get_experiment_by_name(name)
        if found is not None:
            experiment_id = found.experiment_id
        else:
            artifacts = (run_dir / "mlflow-artifacts").resolve().as_uri()
            local = self.uri.startswith("sqlite:")
            experiment_id = client.create_experiment(
                name, artifact_location=artifacts if local else None
            )
        run = client.create_run(experiment_id, run_name=str(record.get("id") or "run"))
        self.run_id = run.info.run_id
        params = [
            Param(_MLFLOW_KEY.sub("_", k)[:250], v[:6000]) for k, v in _params(record).items()
        ]
        tags = [RunTag(k, v[:5000]) for k, v in _tags(record).items()]
        for i in range(0, max(len(params), len(tags)), 100):  # MLflow: <= 100 params per batch
            client.log_batch(self.run_id, params=params[i : i + 100], tags=tags[i : i + 100])

    def log(self, step: int | None, stamp: float, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        millis = int(stamp * 1000)
        batch = [Metric(_MLFLOW_KEY.sub("_", k), v, millis, step or 0) for k, v in metrics.items()]
        self._client.log_batch(self.run_id, metrics=batch)

    def finish(self, record: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        summary = flatten({"summary": record.get("summary")}, "stoker.")
        tags = [RunTag(_MLFLOW_KEY.sub("_", k), v[:5000]) for k, v in summary.items()]
        self._client.log_batch(self.run_id, tags=tags[:100])
        status = {"finished": "FINISHED", "killed": "KILLED"}.get(str(record.get("status")))
        self._client.set_terminated(self.run_id, status or "FAILED")


TRACKERS: dict[str, Callable[[], Tracker]] = {
    "tensorboard": TensorBoardTracker,
    "mlflow": MLflowTracker,
}
"""Tracker names ``Stoker(trackers=[...])`` accepts, and what each makes."""


def make_trackers(specs: Sequence[str | Tracker]) -> list[Tracker]:
    """Trackers from names (``TRACKERS``) or tracker objects; refuses unknown names."""
    if isinstance(specs, str):
        specs = [specs]
    out: list[Tracker] = []
    for spec in specs:
        if isinstance(spec, str):
            if spec not in TRACKERS:
                raise StokerError(
                    f"trackers=[{spec!r}] is not known; choose from {sorted(TRACKERS)} or pass "
                    "a tracker object"
                )
            out.append(TRACKERS[spec]())
        elif all(callable(getattr(spec, m, None)) for m in ("start", "log", "finish")):
            out.append(spec)
        else:
            raise StokerError(
                f"trackers: {spec!r} is neither a tracker name ({sorted(TRACKERS)}) nor an "
                "object with start / log / finish"
            )
    return out


class TrackerFeed:
    """Feeds resolved metrics lines to trackers; a tracker that raises is dropped, once, with
    one warning line (``metrics.jsonl`` has everything)."""

    def __init__(
        self,
        trackers: Sequence[Tracker],
        run_dir: Path,
        record: Callable[[], Mapping[str, Any]],
    ) -> None:
        self.trackers = list(trackers)
        self.run_dir = run_dir
        self._record = record  # a copy of the run record as of now (taken under its lock)
        self._started = False

    def _call(self, what: str, call: Callable[[Tracker], None]) -> None:
        for tracker in list(self.trackers):
            try:
                call(tracker)
            except Exception as exc:
                self.trackers.remove(tracker)
                print(
                    f"stoker: warning: tracker {tracker.name!r} failed in {what} and is dropped "
                    f"for the rest of the run ({type(exc).__name__}: {exc}); metrics.jsonl "
                    "has every metric",
                    file=sys.stderr,
                )

    def _start(self) -> None:
        if not self._started:
            self._started = True
            record = self._record()
            self._call("start", lambda t: t.start(self.run_dir, record))

    def __call__(self, line: Mapping[str, Any]) -> None:
        """One resolved ``metrics.jsonl`` line (``step``, ``time`` and the values)."""
        self._start()
        step = line.get("step")
        stamp = line.get("time")
        numbers = {
            k: float(v)
            for k, v in line.items()
            if k not in ("step", "time") and isinstance(v, int | float) and not isinstance(v, bool)
        }
        if numbers:
            when = float(stamp) if isinstance(stamp, int | float) else time.time()
            self._call(
                "log", lambda t: t.log(step if isinstance(step, int) else None, when, numbers)
            )

    def finish(self, record: Mapping[str, Any]) -> None:
        self._start()
        self._call("finish", lambda t: t.finish(record))
