"""Progressive resizing for images: small images first, full size from a given step on.

The fast.ai DAWNBench recipe (Howard 2018) trained on 128 px, then 224, then 288 px images: a
convolutional network learns coarse features as well from small images, at a fraction of the
compute (a step at half the side costs about a quarter). :class:`ProgressiveResize` is a batch
transform on the device, after the DataLoader: ``images = resize(images, step)``. The side grows
linearly from ``start_size`` to ``final_size`` over ``warmup_steps`` steps, rounded down to a
multiple of ``multiple`` (so a compiled model sees at most ``len(resize.sizes())`` shapes).
The model must accept any input size (global pooling before its classifier, as every modern
CNN has); evaluate at ``final_size``.

For ``start_size=32, final_size=64, warmup_steps=100, multiple=16``: sides 32 for steps 0-49,
48 for 50-99, and 64 (the images untouched) from step 100 on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from stoker.errors import StokerError

__all__ = ["ProgressiveResize"]

_MODES = ("bilinear", "bicubic", "area", "nearest")


@dataclass(frozen=True, slots=True, kw_only=True)
class ProgressiveResize:
    """Side length of a step's images, and the transform that resizes a batch to it."""

    final_size: int
    """Full side length (the images' own; they pass unchanged from ``warmup_steps`` on)."""
    warmup_steps: int
    """Steps until images are full size."""
    start_size: int | None = None
    """Side at step 0 (default: half of ``final_size``)."""
    multiple: int = 8
    """Sides are multiples of this (bounds the shapes a compiled model meets)."""
    mode: Literal["bilinear", "bicubic", "area", "nearest"] = "bilinear"
    """``F.interpolate`` mode (anti-aliased for bilinear and bicubic)."""

    def __post_init__(self) -> None:
        start = self.final_size // 2 if self.start_size is None else self.start_size
        for name, value in (("final_size", self.final_size), ("multiple", self.multiple)):
            if not isinstance(value, int) or value < 1:
                raise StokerError(f"ProgressiveResize.{name}={value!r} must be an int >= 1.")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise StokerError(
                f"ProgressiveResize.warmup_steps={self.warmup_steps!r} must be an int >= 0."
            )
        if not isinstance(start, int) or not self.multiple <= start <= self.final_size:
            raise StokerError(
                f"ProgressiveResize.start_size={start!r} must be an int in "
                f"[multiple={self.multiple}, final_size={self.final_size}]."
            )
        if self.mode not in _MODES:
            raise StokerError(
                f"ProgressiveResize.mode={self.mode!r}; valid choices: {', '.join(_MODES)}."
            )

    def _start(self) -> int:
        return self.final_size // 2 if self.start_size is None else self.start_size

    def size(self, step: int) -> int:
        """The side length at optimizer step ``step`` (0-based)."""
        if step >= self.warmup_steps:
            return self.final_size
        start = self._start()
        raw = start + (self.final_size - start) * step / self.warmup_steps
        return max(self.multiple, int(raw) // self.multiple * self.multiple)

    def sizes(self) -> list[int]:
        """Every side length this schedule uses, ascending."""
        low = max(self.multiple, self._start() // self.multiple * self.multiple)
        return sorted({*range(low, self.final_size, self.multiple), self.final_size})

    def __call__(self, images: Tensor, step: int) -> Tensor:
        """``images`` [B, C, H, W] resized to the side of ``step`` (unchanged at full size).

        Pure tensor work on the images' device: no host sync."""
        if images.dim() != 4:
            raise StokerError(
                f"ProgressiveResize wants images [B, C, H, W]; got {tuple(images.shape)}."
            )
        side = self.size(step)
        if side == self.final_size and images.shape[-2:] == (side, side):
            return images
        smooth = self.mode in ("bilinear", "bicubic")
        return F.interpolate(
            images,
            size=(side, side),
            mode=self.mode,
            antialias=smooth,
            **({"align_corners": False} if smooth else {}),
        )
