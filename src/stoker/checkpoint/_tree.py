"""Plain data + tensors <-> JSON + a flat tensor dict, with no pickle anywhere.

A checkpoint stores everything that is not a module's weights (optimizer and scheduler state,
RNG states, sampler positions, step counters, user extras) as a JSON tree whose tensors live in
a safetensors file. JSON has no tuples, no non-string keys and no tensors, so those are tagged
objects carrying the key ``"__stoker__"``::

    {"step": 3, "betas": (0.9, 0.95), 0: tensor([1., 2.])}
    -> {"__stoker__": "dict", "items": [
           ["step", 3],
           ["betas", {"__stoker__": "tuple", "items": [0.9, 0.95]}],
           [0, {"__stoker__": "tensor", "name": "opt/0"}]]}
       + tensors {"opt/0": tensor([1., 2.])}

A dict whose keys are all strings (and none is ``"__stoker__"``) stays a plain JSON object.
Floats round-trip exactly (``json`` writes ``repr``, NaN and infinities included). Decoding can
only ever build dicts, lists, tuples, sets, numbers, strings, bytes, NumPy arrays/scalars and
tensors — never call anything named by the file.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from stoker.checkpoint.errors import CheckpointError

__all__ = ["TAG", "decode", "encode"]

TAG = "__stoker__"
_NAME_OK = re.compile(r"[^A-Za-z0-9_.\-/]")


class _Encoder:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.tensors: dict[str, torch.Tensor] = {}
        # id(tensor) -> name, so one tensor object referenced twice is stored once.
        self._by_id: dict[int, str] = {}
        self._keep: list[torch.Tensor] = []  # keeps ids stable while encoding

    def _name(self, path: str) -> str:
        base = _NAME_OK.sub("_", path) or "t"
        name, i = base, 1
        while name in self.tensors:
            i += 1
            name = f"{base}~{i}"
        return name

    def tensor(self, t: torch.Tensor, path: str) -> dict[str, Any]:
        seen = self._by_id.get(id(t))
        if seen is not None:
            return {TAG: "tensor", "name": seen}
        if t.layout != torch.strided:
            raise CheckpointError(
                f"cannot checkpoint {path}: a {t.layout} tensor; convert it with .to_dense() "
                "or keep it out of the checkpoint state"
            )
        if t.is_quantized:
            raise CheckpointError(
                f"cannot checkpoint {path}: a quantized tensor ({t.dtype}); save its "
                "int_repr(), q_scale() and q_zero_point() instead"
            )
        name = self._name(path)
        self.tensors[name] = t.detach()
        self._by_id[id(t)] = name
        self._keep.append(t)
        return {TAG: "tensor", "name": name}

    def __call__(self, obj: Any, path: str) -> Any:
        # Order matters: bool is an int, np.bool_ is not; torch.Size is a tuple.
        if obj is None or isinstance(obj, bool | int | str):
            return obj
        if isinstance(obj, float):
            return obj
        if isinstance(obj, torch.Tensor):
            return self.tensor(obj, path)
        if isinstance(obj, Mapping):
            return self.mapping(obj, path)
        if isinstance(obj, list):
            return [self(v, f"{path}/{i}") for i, v in enumerate(obj)]
        if isinstance(obj, tuple):  # includes torch.Size and namedtuples (stored as tuples)
            return {TAG: "tuple", "items": [self(v, f"{path}/{i}") for i, v in enumerate(obj)]}
        if isinstance(obj, set | frozenset):
            items = [self(v, f"{path}/{i}") for i, v in enumerate(obj)]
            return {TAG: "frozenset" if isinstance(obj, frozenset) else "set", "items": items}
        if isinstance(obj, bytes | bytearray):
            return {TAG: "bytes", "b64": base64.b64encode(bytes(obj)).decode("ascii")}
        if isinstance(obj, np.ndarray):
            return self.ndarray(obj, path)
        if isinstance(obj, np.generic):
            return {TAG: "npscalar", "dtype": obj.dtype.str, "value": obj.item()}
        if isinstance(obj, torch.dtype):
            return {TAG: "dtype", "name": str(obj).removeprefix("torch.")}
        if isinstance(obj, torch.device):
            return {TAG: "device", "name": str(obj)}
        raise CheckpointError(
            f"cannot checkpoint {path}: a {type(obj).__module__}.{type(obj).__qualname__} is "
            "neither plain data (dict/list/tuple/str/int/float/bool/None/tensor/ndarray) nor an "
            "object with state_dict()/load_state_dict(); convert it, since checkpoints never "
            "use pickle"
        )

    def mapping(self, obj: Mapping[Any, Any], path: str) -> Any:
        if all(isinstance(k, str) for k in obj) and TAG not in obj:
            return {k: self(v, f"{path}/{k}") for k, v in obj.items()}
        items = []
        for k, v in obj.items():
            if isinstance(k, torch.Tensor | np.ndarray):
                raise CheckpointError(f"cannot checkpoint {path}: a dict key is an array ({k!r})")
            items.append([self(k, f"{path}/key"), self(v, f"{path}/{k}")])
        return {TAG: "dict", "items": items}

    def ndarray(self, arr: np.ndarray, path: str) -> dict[str, Any]:
        if arr.dtype.hasobject:
            raise CheckpointError(
                f"cannot checkpoint {path}: a NumPy array of Python objects; "
                "convert it to a numeric array or a list"
            )
        # Raw bytes in a uint8 tensor + dtype/shape here: covers every NumPy dtype (uint32,
        # datetime64, ...) whether or not safetensors or torch has a matching type.
        raw = torch.from_numpy(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).copy())
        ref = self.tensor(raw, path)
        return {
            TAG: "ndarray",
            "name": ref["name"],
            "dtype": arr.dtype.str,
            "shape": list(arr.shape),
        }


def encode(obj: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """``(json_tree, tensors)`` for ``obj``; tensor names are the key paths below ``prefix``."""
    enc = _Encoder(prefix)
    tree = enc(obj, prefix)
    return tree, enc.tensors


def decode(tree: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode`; builds only plain data, arrays and tensors."""
    if isinstance(tree, list):
        return [decode(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    tag = tree.get(TAG)
    if tag is None:
        return {k: decode(v, tensors) for k, v in tree.items()}
    if tag == "tensor":
        return _tensor(tree["name"], tensors)
    if tag == "dict":
        return {_hashable(decode(k, tensors)): decode(v, tensors) for k, v in tree["items"]}
    if tag == "tuple":
        return tuple(decode(v, tensors) for v in tree["items"])
    if tag == "set":
        return {_hashable(decode(v, tensors)) for v in tree["items"]}
    if tag == "frozenset":
        return frozenset(_hashable(decode(v, tensors)) for v in tree["items"])
    if tag == "bytes":
        return base64.b64decode(tree["b64"])
    if tag == "ndarray":
        raw = _tensor(tree["name"], tensors).numpy()
        return raw.view(np.dtype(tree["dtype"])).reshape(tree["shape"]).copy()
    if tag == "npscalar":
        return np.dtype(tree["dtype"]).type(tree["value"])
    if tag == "dtype":
        dtype = getattr(torch, str(tree["name"]), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown torch dtype {tree['name']!r} in checkpoint")
        return dtype
    if tag == "device":
        return torch.device(str(tree["name"]))
    raise ValueError(f"unknown tag {tag!r} in checkpoint data")


def _tensor(name: Any, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    try:
        return tensors[name]
    except KeyError:
        raise ValueError(
            f"checkpoint data refers to tensor {name!r}, absent from its file"
        ) from None


def _hashable(key: Any) -> Any:
    if isinstance(key, list):  # JSON may hand back a list where a tuple key was meant
        return tuple(_hashable(k) for k in key)
    return key
