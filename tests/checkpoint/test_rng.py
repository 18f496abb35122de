import json
import random

import numpy as np
import torch

from stoker.checkpoint import capture_rng, restore_rng
from stoker.checkpoint._tree import decode, encode


def _draw():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist(), random.gauss(0, 1)


def test_rng_states_survive_a_pickle_free_round_trip():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    tree, tensors = encode(capture_rng(), "rng")
    expected = _draw()
    _draw()
    _draw()  # move every generator on
    restore_rng(decode(json.loads(json.dumps(tree)), tensors))
    assert _draw() == expected
