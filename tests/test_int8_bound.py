"""The Amdahl arithmetic of ``benchmarks/int8_bound.py`` (the script itself is a benchmark)."""

import importlib.util
import math
from pathlib import Path

import pytest

_PATH = Path(__file__).parents[1] / "benchmarks" / "int8_bound.py"
_spec = importlib.util.spec_from_file_location("int8_bound", _PATH)
assert _spec is not None and _spec.loader is not None
int8_bound = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(int8_bound)  # main() is behind __name__ == "__main__": nothing runs


def test_bound_worked_examples() -> None:
    assert int8_bound.amdahl_bound(0.6, 2.0) == pytest.approx(1 / 0.7)
    assert int8_bound.amdahl_bound(0.6, math.inf) == pytest.approx(2.5)
    assert int8_bound.amdahl_bound(0.0, 10.0) == 1.0


def test_kernel_needed_inverts_the_bound() -> None:
    k = int8_bound.kernel_needed(0.6, 1.5)
    assert k == pytest.approx(2.25)
    assert int8_bound.amdahl_bound(0.6, k) == pytest.approx(1.5)
    # a third of the time or less in the linears: no kernel reaches 1.5x
    assert int8_bound.kernel_needed(1 / 3, 1.5) == math.inf


def test_bound_refuses_impossible_inputs() -> None:
    with pytest.raises(ValueError, match=r"s=1\.5"):
        int8_bound.amdahl_bound(1.5, 2.0)
