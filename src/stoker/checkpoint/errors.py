"""The checkpoint's error and warning types."""

from __future__ import annotations

from stoker.errors import StokerError

__all__ = ["CheckpointError", "CheckpointMismatch", "CheckpointWarning"]


class CheckpointError(StokerError):
    """A checkpoint could not be saved, verified or loaded; the message names it and says why."""


class CheckpointMismatch(CheckpointError):
    """The checkpoint is intact but does not fit this run: another model shape, batch size,
    number of processes. Resuming it would be silently wrong, and so would falling back to an
    older checkpoint of the same run, so resuming stops here; the message names the saved and
    the current values and what to do."""


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (corrupt, truncated) or a save failed under ``on_error="warn"``."""
