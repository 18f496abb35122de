"""Models used by stoker's built-in recipes."""

from stoker.models.encoder import PRESETS, Encoder, EncoderConfig

__all__ = ["PRESETS", "Encoder", "EncoderConfig"]
