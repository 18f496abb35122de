"""What a reader needs to judge or rerun a number: versions, CPU model and flags, threads, git."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

# CPU flags that decide which kernels run on x86 (bf16/int8 matrix units).
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile")
_PACKAGES = ("torch", "numpy", "stoker", "rich", "accelerate", "lightning", "torchao", "tokenizers")


# ------------------------------------------------------------------------------ environment


def _cpu_info() -> tuple[str, dict[str, bool] | None]:
    model = platform.processor() or platform.machine()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        if sys.platform == "darwin":
            out = _run(["sysctl", "-n", "machdep.cpu.brand_string"])
            model = out or model
        return model, None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and value.strip():
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return model, {f: f in flags for f in CPU_FLAGS}


def _run(cmd: list[str], cwd: Path | None = None) -> str | None:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _git(repo: Path) -> dict[str, Any] | None:
    revision = _run(["git", "rev-parse", "HEAD"], cwd=repo)
    if revision is None:
        return None
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo)
    return {"revision": revision, "dirty": bool(status)}


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _matmul_speed() -> dict[str, Any]:
    """The measured fp32 / bf16 rates that decide precision="auto" and the compressed forms."""
    from stoker.runtime.hardware import matmul_speed

    speed = matmul_speed("cpu")
    return {
        "fp32_gflops": round(speed.fp32_gflops, 1),
        "bf16_gflops": round(speed.bf16_gflops, 1),
        "favours": "bf16" if speed.favours_bf16 else "fp32",
        "threads": speed.threads,
    }


def environment(repo: Path | None = None) -> dict[str, Any]:
    """What a reader needs to judge or rerun a number: versions, CPU, threads, host, git.

    ``repo`` is where to ask git for the revision (default: the running script's directory).
    """
    if repo is None:
        script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
        repo = script.resolve().parent if script is not None and script.is_file() else Path.cwd()
    cpu_model, flags = _cpu_info()
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    env: dict[str, Any] = {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in _PACKAGES},
        "cpu_model": cpu_model,
        "cpu_flags": flags,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": None if affinity is None else len(affinity),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "thread_env": {
            k: os.environ[k]
            for k in (
                "OMP_NUM_THREADS",
                "MKL_NUM_THREADS",
                "ATEN_CPU_CAPABILITY",
                "ONEDNN_MAX_CPU_ISA",  # caps oneDNN's kernels: an AVX2 run on a newer CPU
            )
            if k in os.environ
        },
        "matmul_speed": _matmul_speed(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cuda": None,
        "git": _git(repo),
    }
    env["versions"]["torch"] = torch.__version__
    if torch.cuda.is_available():
        env["cuda"] = {
            "version": torch.version.cuda,
            "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        }
    return env
