"""What this machine multiplies fast, measured rather than read off CPU flags.

CPU flags say which instructions exist, not what torch's kernels make of them: the same flags can
hide a oneDNN build capped below them (``ONEDNN_MAX_CPU_ISA``), a VM that masks AMX, or an ISA
torch does not dispatch to. And the gap is large both ways: on an AMX Xeon a bf16 matrix product
ran ~6x faster than fp32 (~1,000 against ~170 GFLOP/s on 2 cores), on an AVX2-only EPYC (Zen 3)
40-70x *slower* (~1 against ~50 GFLOP/s per core), because bf16 is then emulated. So every choice
stoker makes from speed (``precision="auto"``, the doctor's bf16 advice, the float parts of a
compressed model) asks :func:`matmul_speed`: a short probe (a few tenths of a second) of 256 x 256
products in fp32 and bf16, interleaved, best of each, cached per machine and torch build under
the stoker cache directory.

``$STOKER_BF16_SPEEDUP`` (bf16 throughput / fp32 throughput, e.g. ``6`` or ``0.03``) replaces the
probe: for a machine whose probe you do not trust, and for tests of both branches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from functools import cache

import torch

from stoker.data.cache import atomic_write_bytes, cache_dir

__all__ = ["BF16_FAST_THRESHOLD", "MatmulSpeed", "bf16_is_fast", "machine_key", "matmul_speed"]

log = logging.getLogger(__name__)

BF16_FAST_THRESHOLD = 1.25
"""bf16 counts as fast where its matrix products run at least this many times fp32's rate: below
that, autocast's casts and fp32 attention/normalisation eat the gain."""

_SIZE = 256  # n of the n x n x n probe: 33.5 MFLOP, ~1 ms in fp32 on one slow core
_BUDGET_S = 0.4  # timed rounds stop after this, but never before _MIN_ROUNDS
_MIN_ROUNDS = 3
_ENV = "STOKER_BF16_SPEEDUP"


@dataclass(frozen=True, slots=True)
class MatmulSpeed:
    """Matrix-product throughput of one device, GFLOP/s (``source``: probe, cache or env)."""

    device: str
    fp32_gflops: float
    bf16_gflops: float
    threads: int
    source: str

    @property
    def bf16_speedup(self) -> float:
        """bf16 throughput / fp32 throughput (6 on an AMX Xeon, ~0.02 on an AVX2 EPYC)."""
        return self.bf16_gflops / self.fp32_gflops if self.fp32_gflops > 0 else 0.0

    @property
    def measured(self) -> bool:
        """Rates timed on this machine (now or cached), not assumed or given."""
        return self.source in ("probe", "cache")

    @property
    def favours_bf16(self) -> bool:
        return self.bf16_speedup >= BF16_FAST_THRESHOLD

    def describe(self) -> str:
        """One line for headers: which precision this hardware favours, and why."""
        favoured = "bf16" if self.favours_bf16 else "fp32"
        how = f"{self.bf16_speedup:.2g}x fp32's rate"
        if self.source == "env":
            return f"{favoured} (${_ENV}={self.bf16_speedup:g})"
        if not self.measured:
            return f"{favoured} ({self.source})"
        return (
            f"{favoured} (bf16 matrix products at {how}: {self.bf16_gflops:.0f} vs "
            f"{self.fp32_gflops:.0f} GFLOP/s, {self.threads} thread(s))"
        )


def bf16_is_fast(device: torch.device | str) -> bool:
    """True where bf16 matrix products run clearly faster than fp32 on ``device``."""
    return matmul_speed(device).favours_bf16


def matmul_speed(device: torch.device | str) -> MatmulSpeed:
    """Measured fp32 and bf16 matrix-product throughput of ``device`` (cached, see module doc)."""
    dev = torch.device(device)
    threads = torch.get_num_threads()
    override = os.environ.get(_ENV)
    if override:
        try:
            speedup = float(override)
        except ValueError:
            speedup = -1.0
        if not speedup > 0:
            from stoker.errors import StokerError

            raise StokerError(
                f"${_ENV}={override!r} is not a positive number; set it to bf16's throughput "
                "over fp32's on this machine (e.g. 6 or 0.03), or unset it to measure"
            )
        return MatmulSpeed(str(dev.type), 1.0, speedup, threads, "env")
    if dev.type == "cuda":
        # Not probed: every CUDA GPU that reports bf16 support runs it on tensor cores.
        bf16 = 2.0 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 0.0
        return MatmulSpeed("cuda", 1.0, bf16, threads, "cuda capability")
    if dev.type != "cpu":
        return MatmulSpeed(dev.type, 1.0, 0.0, threads, f"{dev.type}: not probed")
    return _cpu_speed(threads)


@cache
def _cpu_speed(threads: int) -> MatmulSpeed:
    path = cache_dir("hardware") / f"matmul-{machine_key(threads)}.json"
    try:
        if not path.is_file() or path.stat().st_size > 4096:  # a FIFO would block a read
            raise ValueError("not a cache file")
        saved = json.loads(path.read_bytes())
        speed = MatmulSpeed(
            "cpu",
            float(saved["fp32_gflops"]),
            float(saved["bf16_gflops"]),
            threads,
            "cache",
        )
        if speed.fp32_gflops > 0 and speed.bf16_gflops >= 0:
            return speed
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no cache yet, or a damaged one: measure
    speed = _probe_cpu(threads)
    try:
        atomic_write_bytes(path, json.dumps(asdict(speed)).encode())
    except OSError as exc:  # a read-only cache costs a re-probe next time, nothing else
        log.debug("could not cache the matmul probe at %s: %s", path, exc)
    return speed


def machine_key(threads: int) -> str:
    """What the probe's answer depends on: CPU model, torch build and ISA caps, threads."""
    model = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            model = next((line for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    parts = [
        model,
        platform.machine(),
        torch.__version__,
        torch.backends.cpu.get_cpu_capability(),
        os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
        os.environ.get("DNNL_MAX_CPU_ISA", ""),
        str(threads),
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _probe_cpu(threads: int) -> MatmulSpeed:
    """Best-of-rounds GFLOP/s of an n x n product in fp32 and bf16, timed interleaved."""
    n = _SIZE
    gen = torch.Generator().manual_seed(0)  # not the global RNG: probing must not shift a run
    a32 = torch.randn(n, n, generator=gen)
    b32 = torch.randn(n, n, generator=gen)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    pairs = [(a32, b32), (a16, b16)]
    with torch.no_grad():
        for a, b in pairs:  # warm-up: oneDNN builds its kernel for a shape on first use
            torch.mm(a, b)
            torch.mm(a, b)
        best = [float("inf"), float("inf")]
        rounds, start = 0, time.perf_counter()
        while rounds < _MIN_ROUNDS or time.perf_counter() - start < _BUDGET_S:
            for i, (a, b) in enumerate(pairs):
                t0 = time.perf_counter()
                torch.mm(a, b)
                best[i] = min(best[i], time.perf_counter() - t0)
            rounds += 1
    flop = 2 * n**3
    speed = MatmulSpeed("cpu", flop / best[0] / 1e9, flop / best[1] / 1e9, threads, "probe")
    log.info("matmul probe: %s", speed.describe())
    return speed
