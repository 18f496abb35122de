"""What the machine and the software were: versions, packages, host, CPU and GPU."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import socket
import sys
from pathlib import Path
from typing import Any

import torch

__all__ = ["hardware", "packages", "versions"]


def packages() -> dict[str, str]:
    """``{distribution name: version}`` of every installed package, sorted by name."""
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"] if dist.metadata else None
        if name:
            found.setdefault(str(name).lower(), str(dist.version))
    return dict(sorted(found.items()))


def versions() -> dict[str, Any]:
    try:
        stoker_version = importlib.metadata.version("stoker")
    except importlib.metadata.PackageNotFoundError:
        stoker_version = None
    return {
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "stoker": stoker_version,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware() -> dict[str, Any]:
    """Host name, OS, CPU model and core count, GPUs (only if CUDA is already available)."""
    gpus: list[dict[str, Any]] = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append({"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1)})
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(affinity) if affinity is not None else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpus": gpus,
        "executable": sys.executable,
    }
