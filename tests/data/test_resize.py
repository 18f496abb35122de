"""Progressive resizing: the schedule's documented sizes, the transform, the example."""

import importlib.util
from pathlib import Path

import pytest
import torch

from stoker.data import ProgressiveResize
from stoker.errors import StokerError

EXAMPLE = Path(__file__).parents[2] / "examples" / "progressive_resize.py"


def test_docstring_sizes_and_bounded_shapes():
    r = ProgressiveResize(start_size=32, final_size=64, warmup_steps=100, multiple=16)
    got = {s: r.size(s) for s in (0, 49, 50, 99, 100, 10_000)}
    assert got == {0: 32, 49: 32, 50: 48, 99: 48, 100: 64, 10_000: 64}
    assert r.sizes() == [32, 48, 64]
    seen = {r.size(s) for s in range(200)}
    assert seen == set(r.sizes())
    assert [r.size(s) for s in range(200)] == sorted(r.size(s) for s in range(200))


def test_transform_resizes_then_passes_full_size_through():
    r = ProgressiveResize(final_size=64, warmup_steps=10, multiple=8)
    images = torch.rand(2, 3, 64, 64)
    small = r(images, 0)
    assert small.shape == (2, 3, 32, 32)
    # Anti-aliased downsampling keeps the mean colour.
    assert torch.allclose(small.mean(dim=(2, 3)), images.mean(dim=(2, 3)), atol=1e-2)
    assert r(images, 10) is images


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"final_size": 64, "warmup_steps": 5, "start_size": 100}, "start_size"),
        ({"final_size": 64, "warmup_steps": -1}, "warmup_steps"),
        ({"final_size": 64, "warmup_steps": 5, "mode": "cubic"}, "valid choices"),
    ],
)
def test_bad_config_is_one_clear_error(kwargs, match):
    with pytest.raises(StokerError, match=match):
        ProgressiveResize(**kwargs)


def test_example_trains_on_generated_images():
    spec = importlib.util.spec_from_file_location("progressive_resize", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    images, _ = module.make_images(8, seed=0)
    assert images.shape == (8, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    results = module.main(["--steps", "40", "--batch-size", "32"])
    for r in results.values():
        assert r["seconds"] > 0
        assert r["accuracy"] > 0.3  # above chance (0.25) after 40 steps (~95% after 60)
