"""The precision policy: which dtype matrix products run in, and whether a grad scaler is needed.

``auto`` chooses bf16 autocast only where the hardware multiplies bf16 matrices natively and fast:
CUDA GPUs that report bf16 support, and x86 CPUs with AMX or AVX512-BF16. On this project's
development machine (Xeon with AMX) a 2048x2048 bf16 matmul ran at ~1000 GFLOP/s against ~120
for fp32. Elsewhere ``auto`` stays in fp32: emulated bf16 on a CPU without those units is slower.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from stoker.errors import StokerError

__all__ = ["PRECISIONS", "Precision", "PrecisionPolicy", "has_fast_bf16", "resolve_precision"]

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16", "auto")

_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


def has_fast_bf16(device: torch.device) -> bool:
    """True where bf16 matrix products run on dedicated hardware on ``device``."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        cpu = torch.cpu
        amx = getattr(cpu, "_is_amx_tile_supported", None)
        avx512_bf16 = getattr(cpu, "_is_avx512_bf16_supported", None)
        return bool((amx is not None and amx()) or (avx512_bf16 is not None and avx512_bf16()))
    return False


def resolve_precision(name: str, device: torch.device) -> Precision:
    """Validate ``name`` and resolve ``auto`` for ``device``."""
    if name not in PRECISIONS:
        raise StokerError(f"precision={name!r} is not known; choose one of {', '.join(PRECISIONS)}")
    if name == "auto":
        return "bf16" if has_fast_bf16(device) else "fp32"
    if name == "fp16" and device.type == "cpu":
        raise StokerError(
            "precision='fp16' needs a GPU (fp16 autocast with a grad scaler is a CUDA recipe); "
            "on CPU use precision='bf16' or 'auto'"
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
