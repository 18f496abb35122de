"""The checkpoint's error and warning types."""

from __future__ import annotations

from stoker.errors import StokerError

__all__ = ["CheckpointError", "CheckpointWarning"]


class CheckpointError(StokerError):
    """A checkpoint could not be saved, verified or loaded; the message names it and says why."""


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (corrupt, truncated) or a save failed under ``on_error="warn"``."""
