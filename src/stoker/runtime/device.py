"""Choosing the device a run uses: ``auto`` prefers cuda, then mps, then cpu."""

from __future__ import annotations

import os
import shutil

import torch

from stoker.errors import StokerError

__all__ = ["check_compile", "resolve_device"]


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(
    spec: str | torch.device = "auto", *, local_rank: int | None = None
) -> torch.device:
    """Turn a device request into a :class:`torch.device` that exists on this machine.

    ``"auto"`` picks ``cuda`` (the process's ``LOCAL_RANK`` GPU when launched with several
    processes), else ``mps``, else ``cpu``. An explicit device that is not present raises a
    :class:`StokerError` naming what is available instead.
    """
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if isinstance(spec, str) and spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as exc:
        raise StokerError(
            f"device={spec!r} is not a device name; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"
        ) from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise StokerError(
                f"device={spec!r} was requested but this machine has no usable CUDA GPU "
                f"(torch {torch.__version__}, torch.cuda.is_available() is False); "
                "use device='auto' or device='cpu'"
            )
        count = torch.cuda.device_count()
        if device.index is None:
            return torch.device("cuda", local_rank % count)
        if device.index >= count:
            raise StokerError(
                f"device={spec!r} was requested but only {count} CUDA device(s) exist "
                f"(cuda:0..cuda:{count - 1}); pick one of those or use device='auto'"
            )
        return device
    if device.type == "mps" and not _mps_available():
        raise StokerError(
            f"device={spec!r} was requested but MPS is not available on this machine; "
            "use device='auto' or device='cpu'"
        )
    if device.type not in ("cpu", "cuda", "mps"):
        raise StokerError(
            f"device={spec!r} is not supported by stoker; use 'auto', 'cpu', 'cuda[:N]' or 'mps'"
        )
    return device


def _have_cxx_compiler() -> bool:
    return bool(os.environ.get("CXX") or any(shutil.which(c) for c in ("g++", "c++", "clang++")))


def check_compile(device: torch.device) -> None:
    """Refuse ``compile=True`` where it cannot work (no dynamo, no C++ compiler for the CPU
    inductor backend, MPS), with what to do instead."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        raise StokerError(
            "compile=True but torch.compile is not supported on this Python/torch "
            f"(torch {torch.__version__}); pass compile=False"
        )
    if device.type == "cpu" and not _have_cxx_compiler():
        raise StokerError(
            "compile=True on CPU needs a C++ compiler for the inductor backend and none was found "
            "(g++, c++, clang++ or $CXX); install one (e.g. `apt-get install g++`) or pass "
            "compile=False"
        )
    if device.type == "mps":
        raise StokerError("compile=True is not supported on MPS by stoker yet; pass compile=False")
