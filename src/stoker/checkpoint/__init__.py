"""Atomic, verified, pickle-free checkpoints and exact resume.

- :func:`save` / :func:`load`: a dict of modules, optimizers, schedulers, samplers and plain
  data to a ``step-N/`` directory (weights in safetensors, the rest JSON + safetensors, a
  SHA-256 manifest written last, atomic rename) and back, in place.
- :func:`verify`, :func:`latest_valid`, :func:`list_checkpoints`: find the newest checkpoint
  whose checksums hold; corrupt or truncated ones are skipped with a warning.
- :class:`Checkpointer`: every N steps / T minutes, keep the last K, resume="auto", optional
  background writing, and the fault policy for a full disk or a permission error.
- :func:`capture_rng` / :func:`restore_rng`: Python, NumPy, torch CPU/CUDA generators.
"""

from stoker.checkpoint.checkpointer import CheckpointConfig, Checkpointer
from stoker.checkpoint.errors import CheckpointError, CheckpointMismatch, CheckpointWarning
from stoker.checkpoint.manifest import Manifest, read_manifest, verify
from stoker.checkpoint.resume import checkpoint_name, latest_valid, list_checkpoints, prune
from stoker.checkpoint.rng import capture_rng, restore_rng
from stoker.checkpoint.store import load, save

__all__ = [
    "CheckpointConfig",
    "CheckpointError",
    "CheckpointMismatch",
    "CheckpointWarning",
    "Checkpointer",
    "Manifest",
    "capture_rng",
    "checkpoint_name",
    "latest_valid",
    "list_checkpoints",
    "load",
    "prune",
    "read_manifest",
    "restore_rng",
    "save",
    "verify",
]
