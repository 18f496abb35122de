"""The precision policy: which dtype matrix products run in, and whether a grad scaler is needed.

``auto`` chooses bf16 autocast only where bf16 matrix products are *measured* faster than fp32 on
this device (:func:`stoker.runtime.hardware.bf16_is_fast`): ~6x on an AMX Xeon, but 40-70x slower
on an AVX2-only CPU that emulates bf16. Elsewhere ``auto`` stays in fp32.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from stoker.errors import StokerError
from stoker.runtime.hardware import bf16_is_fast, matmul_speed

__all__ = ["PRECISIONS", "Precision", "PrecisionPolicy", "resolve_precision"]

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16", "auto")

log = logging.getLogger(__name__)

_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(name: str, device: torch.device) -> Precision:
    """Validate ``name`` and resolve ``auto`` for ``device``."""
    if name not in PRECISIONS:
        raise StokerError(f"precision={name!r} is not known; choose one of {', '.join(PRECISIONS)}")
    if name == "auto":
        return "bf16" if bf16_is_fast(device) else "fp32"
    if name == "fp16" and device.type == "cpu":
        raise StokerError(
            "precision='fp16' needs a GPU (fp16 autocast with a grad scaler is a CUDA recipe); "
            "on CPU use precision='bf16' or 'auto'"
        )
    if name == "bf16" and device.type == "cpu" and not (speed := matmul_speed(device)).favours_bf16:
        log.warning(
            "precision='bf16' on a CPU that runs bf16 matrix products at %.2gx fp32's rate: "
            "expect a slower step than fp32; precision='auto' measures this and picks fp32 here",
            speed.bf16_speedup,
        )
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise StokerError(
            f"precision='bf16' was requested but {torch.cuda.get_device_name(device)} has no "
            "bf16 support; use precision='fp16' or 'auto'"
        )
    return name  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class PrecisionPolicy:
    """A resolved precision for one device."""

    precision: Precision
    device_type: str

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype autocast runs matrix products in, or None for plain fp32."""
        return _DTYPES.get(self.precision)

    @property
    def needs_scaler(self) -> bool:
        """fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range."""
        return self.precision == "fp16"

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Autocast for this policy; a no-op context for fp32."""
        dtype = self.autocast_dtype
        if dtype is None:
            yield
            return
        with torch.autocast(device_type=self.device_type, dtype=dtype):
            yield
