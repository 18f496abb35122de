"""Your own state in stoker's checkpoints: ``stoker.prepare(..., state={"name": obj})``.

Each value is either

- an object with ``state_dict()`` / ``load_state_dict()`` (an ``nn.Module`` holding an RNN's
  hidden state, an EMA, your own progress class), loaded through its own method; or
- a ``dict`` of plain values and tensors (the epoch, a hand-managed learning rate, the best
  validation loss, an RNN's carried hidden state as a tuple of tensors), restored *in place*:
  its contents are replaced by the saved ones, so every reference to the dict sees them.
  ``vars(namespace)`` is such a dict, for an ``argparse.Namespace`` or a ``SimpleNamespace``;
- :class:`Variables`: some names of a namespace dict, above all a script's ``globals()``, so a
  script whose loop keeps ``epoch``, ``lr`` or ``best_val_loss`` in module variables becomes
  resumable without rewriting every use of them.

Stored through the checkpoint's JSON + safetensors tree (see ``stoker/checkpoint/_tree.py``),
never pickle: values must be plain data (numbers, strings, None, lists, tuples, dicts, tensors,
NumPy arrays). Restored tensors come back on the run's device.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from stoker.errors import StokerError
from stoker.runtime.nested import map_tensors

__all__ = ["TrackedState", "Variables"]


def _stateful(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(
        getattr(obj, "load_state_dict", None)
    )


class Variables:
    """The variables ``names`` of ``namespace`` (a dict: a script's ``globals()``, ``vars(args)``)
    as one checkpointed object; resume assigns them back by name and leaves every other name
    alone.

    >>> epoch, lr = 3, 0.5
    >>> Variables(globals(), "epoch", "lr").state_dict()
    {'epoch': 3, 'lr': 0.5}
    """

    def __init__(self, namespace: dict[str, Any], *names: str) -> None:
        if not isinstance(namespace, dict):
            raise StokerError(
                f"Variables(namespace, *names) takes a dict such as globals(), got "
                f"{type(namespace).__name__}"
            )
        missing = [n for n in names if not isinstance(n, str) or n not in namespace]
        if not names or missing:
            raise StokerError(
                f"Variables(...): {missing or 'no names'} not defined yet; assign each variable "
                "its starting value before prepare(), e.g. epoch = 1"
            )
        self.namespace = namespace
        self.names = names

    def state_dict(self) -> dict[str, Any]:
        return {name: self.namespace[name] for name in self.names}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in self.names:
            self.namespace[name] = state[name]


class TrackedState:
    """The user's named objects, checkpointed as one entry (``"user"``)."""

    def __init__(self, objects: Mapping[str, Any], device: torch.device) -> None:
        if not isinstance(objects, Mapping):
            raise StokerError(
                f"prepare(state=...) takes a dict of name -> object, got "
                f"{type(objects).__name__}; e.g. state={{'progress': {{'epoch': 0}}}}"
            )
        bad = {
            str(k): type(v).__name__
            for k, v in objects.items()
            if not isinstance(k, str) or not (_stateful(v) or isinstance(v, dict))
        }
        if bad:
            raise StokerError(
                f"prepare(state=...): {bad} cannot be checkpointed; each value must be a dict "
                "(restored in place) or have state_dict()/load_state_dict(), under a str name"
            )
        self.objects = dict(objects)
        self.device = device

    def state_dict(self) -> dict[str, Any]:
        return {
            name: dict(obj) if isinstance(obj, dict) else obj.state_dict()
            for name, obj in self.objects.items()
        }

    def check_state_dict(self, state: Any) -> None:
        """Refuse a checkpoint that lacks a tracked name (called before anything is loaded): the
        older checkpoints of the run lack it too, so resuming stops with this message."""
        from stoker.checkpoint.errors import CheckpointMismatch

        held = sorted(state) if isinstance(state, dict) else []
        missing = sorted(set(self.objects) - set(held))
        if missing:
            raise CheckpointMismatch(
                f"the user state has no {missing} (it holds {held}); resume with the same "
                "prepare(state=...) names, or pass resume='never'"
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, obj in self.objects.items():
            if isinstance(obj, dict | Variables):  # plain data: its tensors go to the device
                saved = map_tensors(lambda t: t.to(self.device), state[name])
                if isinstance(obj, Variables):
                    obj.load_state_dict(saved)
                else:
                    obj.clear()
                    obj.update(saved)
            else:
                obj.load_state_dict(state[name])
