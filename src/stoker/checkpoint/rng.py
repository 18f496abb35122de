"""Capture and restore every random number generator a training step may draw from.

Python's ``random`` and NumPy's global generator hold non-tensor state (a tuple of 625 ints;
a ``uint32`` array plus counters); the checkpoint stores them as JSON and raw bytes, never
pickle (see ``_tree.py``). torch's CPU generator is a ``uint8`` tensor; CUDA keeps one per
device, captured only if this process has initialised CUDA (otherwise no kernel drew from it).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["capture_rng", "check_rng", "restore_rng"]


def capture_rng() -> dict[str, Any]:
    """The states of Python's, NumPy's and torch's (CPU, CUDA, MPS) global generators."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    mps = getattr(torch, "mps", None)
    if mps is not None and torch.backends.mps.is_available():
        state["mps"] = mps.get_rng_state()
    return state


def check_rng(state: Any) -> None:
    """Raise ``TypeError`` / ``ValueError`` unless :func:`restore_rng` would accept ``state``.

    Each state is put into a throwaway generator of its kind, so a malformed one is found
    before any of the process's generators (or anything else) is touched.
    """
    if not isinstance(state, dict):
        raise TypeError(f"RNG state is a {type(state).__name__}, not a dict")
    if "python" in state:
        version, internal, gauss = state["python"]
        random.Random().setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        np.random.RandomState().set_state(tuple(state["numpy"]))
    if "torch" in state:
        try:
            torch.Generator().set_state(state["torch"])
        except RuntimeError as exc:  # wrong size or dtype
            raise ValueError(f"torch RNG state: {exc}") from None


def restore_rng(state: dict[str, Any]) -> None:
    """Put back the states :func:`capture_rng` returned (as decoded from a checkpoint)."""
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        np.random.set_state(tuple(state["numpy"]))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = list(state["cuda"])
        # A job resumed on fewer GPUs restores the ones it has.
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    if "mps" in state and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])
