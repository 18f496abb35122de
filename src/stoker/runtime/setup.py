"""What a checkpoint remembers of the run that wrote it, and which changes a resume accepts.

A resumed run continues the training it checkpointed only if what decides which samples each
step sees is unchanged. That is refused, with :class:`~stoker.checkpoint.CheckpointMismatch`
naming the saved and the current value and what to do:

- ``seed``: every epoch's data order is a function of (seed, epoch), so the saved position
  would be replayed in another order;
- each loader's global batch (batch size x processes) and batches per epoch: checked by the
  loader itself (:meth:`~stoker.runtime.prepared.PreparedLoader.check_state_dict`), since its
  position is counted in batches. The number of processes may change when the global batch
  does not (2 processes x 4 -> 1 x 8): rank r of W takes samples r, r+W, ... of one order, so
  a step sees the same samples. A loader whose own sampler splits the data by rank refuses it.

Everything else may change and is handled exactly: ``device``, ``precision``, ``compile``,
``world_size`` (model and optimizer are stored whole or, under FSDP, as shards any number of
processes reads; the processes that did not exist keep their own random state, so dropout masks
differ from an uninterrupted run), ``accumulation_steps`` (the next accumulation window starts
at the resumed step) and the user's own ``config`` (a new learning rate, say). The run continues
from the checkpoint with the new values, and ``record.json`` says what changed (see
:meth:`RunServices.attach`).

    >>> saved = RunSetup({"seed": 0, "world_size": 2, "precision": "fp32"}, {"lr": 0.1})
    >>> now = RunSetup({"seed": 0, "world_size": 2, "precision": "bf16"}, {"lr": 0.05})
    >>> now.check(saved.state_dict())
    >>> now.restored(saved.state_dict())
    >>> now.changes()
    {'config.lr': {'was': 0.1, 'now': 0.05}, 'settings.precision': {'was': 'fp32', 'now': 'bf16'}}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["REFUSED", "RunSetup"]

REFUSED = ("seed",)
"""Settings a resume may not change (see the module docstring)."""


def _refusal(key: str, was: Any, now: Any) -> str:
    start_over = "or start over with resume='never' or a new run directory"
    return (
        f"the checkpoint was written with seed={was!r} and this run has seed={now!r}: every "
        "epoch's data order follows the seed, so replaying the saved position would repeat "
        f"some samples and skip others; pass seed={was!r}, {start_over}"
    )


def _flatten(obj: Any, prefix: str) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` under ``"config"`` -> ``{"config.a.b": 1}`` (lists stay values)."""
    if isinstance(obj, Mapping) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}"))
        return out
    return {prefix: obj}


class RunSetup:
    """This run's settings and config; what the checkpoint it resumed from held, once known."""

    def __init__(self, settings: Mapping[str, Any], config: Any = None) -> None:
        from stoker.records.record import jsonable

        self.settings = dict(settings)
        self.config = jsonable(config)
        self.saved: dict[str, Any] | None = None
        """The setup stored in the checkpoint this run resumed from (None: not resumed, or a
        checkpoint written before setups were stored)."""

    def state_dict(self) -> dict[str, Any]:
        return {"settings": self.settings, "config": self.config}

    def check(self, saved: Any) -> None:
        """Refuse to resume from a checkpoint whose setup differs in a :data:`REFUSED` key."""
        from stoker.checkpoint.errors import CheckpointError, CheckpointMismatch

        if saved is None:  # written before setups were stored: nothing to compare
            return
        if not isinstance(saved, Mapping) or not isinstance(saved.get("settings"), Mapping):
            raise CheckpointError(f"its setup is malformed ({type(saved).__name__})")
        for key in REFUSED:
            was, now = saved["settings"].get(key), self.settings.get(key)
            if key in saved["settings"] and was != now:
                raise CheckpointMismatch(_refusal(key, was, now))

    def restored(self, saved: Any) -> None:
        self.saved = dict(saved) if isinstance(saved, Mapping) else None

    def changes(self) -> dict[str, dict[str, Any]]:
        """``{"settings.precision": {"was": "fp32", "now": "bf16"}, ...}``: what differs from
        the checkpoint's setup (empty when not resumed)."""
        if self.saved is None:
            return {}
        was = {
            **_flatten(self.saved.get("settings") or {}, "settings"),
            **_flatten(self.saved.get("config"), "config"),
        }
        now = {**_flatten(self.settings, "settings"), **_flatten(self.config, "config")}
        absent = "<absent>"
        return {
            key: {"was": was.get(key, absent), "now": now.get(key, absent)}
            for key in sorted(set(was) | set(now))
            if was.get(key, absent) != now.get(key, absent)
        }
