"""Apply a function to every tensor of a nested model output or batch, keeping container types.

Outputs and batches are tensors inside dicts, lists, tuples, namedtuples and dataclasses. HF
``transformers``' ``ModelOutput`` is a dataclass *and* an ``OrderedDict`` whose fields are also
attributes (``outputs.loss``, ``outputs["loss"]`` and ``outputs[0]`` are one tensor): rebuilt as
a plain ``dict`` it loses ``.loss``. So every container is rebuilt as its own type:

- a dataclass instance (``ModelOutput`` included): ``dataclasses.replace`` with its mapped
  ``__init__`` fields, which runs ``__init__`` and ``__post_init__`` again, as the model did;
- a namedtuple: ``type(t)(*items)``; another list or tuple: ``type(t)(items)``;
- a plain dict: a new dict; a dict subclass or another mutable mapping (HF ``BatchEncoding``
  is a ``UserDict``, not a dict): ``copy.copy`` and then item assignment (keeps ``OrderedDict``
  order, a ``defaultdict``'s factory, instance attributes such as ``BatchEncoding``'s
  encodings);
- anything else (numbers, strings, None, unknown objects) as it is.

    >>> import collections, torch
    >>> Pair = collections.namedtuple("Pair", "a b")
    >>> out = map_tensors(lambda t: t * 2, {"x": Pair(torch.ones(1), [torch.ones(1), "s"])})
    >>> out["x"].a, out["x"].b
    (tensor([2.]), [tensor([2.]), 's'])
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, MutableMapping
from typing import Any

import torch

__all__ = ["map_tensors"]


def map_tensors(fn: Callable[[torch.Tensor], Any], obj: Any) -> Any:
    """``obj`` with every tensor ``t`` in it replaced by ``fn(t)``, containers rebuilt as their
    own types (see the module docstring)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {
            f.name: map_tensors(fn, getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init
        }
        return dataclasses.replace(obj, **fields)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(map_tensors(fn, o) for o in obj))
    if isinstance(obj, list | tuple):
        return type(obj)(map_tensors(fn, o) for o in obj)
    if type(obj) is dict:
        return {k: map_tensors(fn, v) for k, v in obj.items()}
    if isinstance(obj, MutableMapping):
        out = copy.copy(obj)  # a UserDict's copy has its own ``data``: the original is kept
        for k, v in obj.items():
            out[k] = map_tensors(fn, v)
        return out
    return obj
