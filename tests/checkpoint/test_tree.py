import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from stoker.checkpoint._tree import decode, encode
from stoker.checkpoint.errors import CheckpointError as StokerError

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
keys = st.text(max_size=6) | st.integers() | st.tuples(st.integers(), st.text(max_size=3))
trees = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.tuples(children, children)
        | st.dictionaries(keys, children, max_size=4)
    ),
    max_leaves=20,
)


def _same(a, b):
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@given(trees)
def test_plain_data_round_trips_exactly_through_json(tree):
    import json

    encoded, tensors = encode(tree, "x")
    assert tensors == {}
    text = json.dumps(encoded)  # must be JSON-serialisable as is
    assert _same(decode(json.loads(text), {}), tree)


def test_tensors_arrays_and_special_values_round_trip():
    t = torch.randn(3, 2)
    obj = {
        "t": t,
        "same": t,  # the same object twice: stored once
        "bf16": torch.ones(2, dtype=torch.bfloat16),
        "arr": np.arange(6, dtype=np.uint32).reshape(2, 3),
        "np_scalar": np.float32(1.5),
        "bytes": b"\x00\xff",
        "set": {1, 2},
        "dtype": torch.float16,
        "device": torch.device("cpu"),
        "size": torch.Size([2, 3]),
        "inf": float("-inf"),
        "__stoker__": "a user key that looks like our tag",
    }
    tree, tensors = encode(obj, "p")
    assert len(tensors) == 3  # t, bf16, the raw bytes of arr
    out = decode(tree, tensors)
    assert torch.equal(out["t"], t) and out["same"] is out["t"]
    assert out["bf16"].dtype == torch.bfloat16
    assert out["arr"].dtype == np.uint32 and out["arr"].shape == (2, 3)
    assert np.array_equal(out["arr"], obj["arr"])
    assert out["np_scalar"].dtype == np.float32 and out["np_scalar"] == 1.5
    assert out["bytes"] == b"\x00\xff" and out["set"] == {1, 2}
    assert out["dtype"] is torch.float16 and out["device"] == torch.device("cpu")
    assert out["size"] == (2, 3) and out["inf"] == float("-inf")
    assert out["__stoker__"] == obj["__stoker__"]


def test_unsupported_object_names_its_key_path():
    with pytest.raises(StokerError, match=r"extra/fn.*function"):
        encode({"fn": lambda: 0}, "extra")


def test_decode_rejects_unknown_tags():
    with pytest.raises(ValueError, match="unknown tag"):
        decode({"__stoker__": "pickle", "data": "..."}, {})
