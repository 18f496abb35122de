"""The FLOP/s a device can reach, the denominator of MFU.

On a CPU it is measured: dense matrix products of growing size (512, 1024, 2048; the larger
ones only while a product takes under a quarter of a second, so a slow dtype — bf16 emulated
on an AVX2 CPU — stops early), best rate over sizes and rounds, cached per machine, torch build,
ISA caps and thread count (``stoker.runtime.hardware.machine_key``). A measured peak is what
this machine's kernels reach, so a model step cannot beat it by more than timing noise.

On a GPU it comes from a table of **dense** peaks of the data sheets (sparse peaks, twice the
dense ones, are the classic error that puts MFU at half its value), labelled as a table value;
a GPU not in the table is measured like a CPU.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from functools import cache

import torch

from stoker.data.cache import atomic_write_bytes, cache_dir
from stoker.errors import StokerError
from stoker.runtime.hardware import machine_key

__all__ = ["DENSE_TFLOPS", "PeakFlops", "peak_flops"]

log = logging.getLogger(__name__)

DENSE_TFLOPS: dict[str, dict[str, float]] = {
    # name as in torch.cuda.get_device_name: dense TFLOP/s per dtype (fp32 = without TF32)
    "H100 SXM": {"bf16": 989.0, "fp16": 989.0, "tf32": 495.0, "fp32": 67.0},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L4": {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3},
    "A10": {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2},
    "V100": {"fp16": 125.0, "fp32": 15.7},
}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_SIZES = (512, 1024, 2048)
# A larger size (8x the work) is tried only while it would take at most this long at the rate
# just measured: the probe runs on the training thread, and a dtype the CPU computes slowly
# (bf16 on AVX2 at ~2% of fp32) stops at the smallest size instead of stalling for seconds.
_SLOW_S = 0.25
_ROUNDS = 3


@dataclass(frozen=True, slots=True)
class PeakFlops:
    """Peak FLOP/s of ``device`` computing in ``dtype``; ``source``: probe, cache or table."""

    device: str
    dtype: str
    flops: float
    source: str

    def describe(self) -> str:
        return f"{self.flops / 1e12:.3g} TFLOP/s {self.dtype} ({self.source})"


def peak_flops(
    device: torch.device | str, dtype: str = "fp32", *, refresh: bool = False
) -> PeakFlops:
    """Peak dense matrix-product FLOP/s of ``device`` in ``dtype`` ("fp32", "bf16", "fp16";
    "tf32" on CUDA). Measured and cached on CPU; a dense data-sheet value on known GPUs.

    ``refresh`` measures again and keeps the better of that and the cached value: a probe
    taken while other work shared the cores reads low, and a peak must never be beaten.
    """
    dev = torch.device(device)
    if dtype not in (*_DTYPES, "tf32"):
        raise StokerError(f"peak_flops dtype={dtype!r}; choose fp32, bf16, fp16 or tf32")
    if dev.type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(dev)
        for key, peaks in DENSE_TFLOPS.items():
            if all(word in name for word in key.split()) and dtype in peaks:
                return PeakFlops("cuda", dtype, peaks[dtype] * 1e12, f"data sheet, {key}, dense")
    if dtype == "tf32":
        raise StokerError("tf32 is a CUDA mode; measure fp32 on this device")
    if refresh:
        _measured.cache_clear()
    return _measured(str(dev), dtype, torch.get_num_threads(), refresh)


@cache
def _measured(device: str, dtype: str, threads: int, refresh: bool) -> PeakFlops:
    is_cpu = torch.device(device).type == "cpu"
    path = cache_dir("hardware") / f"peak-{dtype}-{machine_key(threads)}.json"
    cached = 0.0
    if is_cpu:
        try:
            if path.is_file() and path.stat().st_size < 4096:  # never block on a FIFO
                saved = json.loads(path.read_bytes())
                if isinstance(saved.get("flops"), float) and saved["flops"] > 0:
                    cached = saved["flops"]
        except (OSError, ValueError, AttributeError):
            pass  # measure again
        if cached and not refresh:
            return PeakFlops(device, dtype, cached, "cache")
    measured = _probe(torch.device(device), _DTYPES[dtype])
    peak = PeakFlops(device, dtype, max(measured, cached), "probe")
    if is_cpu:
        try:
            atomic_write_bytes(path, json.dumps(asdict(peak)).encode())
        except OSError as exc:
            log.debug("could not cache the peak probe at %s: %s", path, exc)
    log.info("peak probe: %s", peak.describe())
    return peak


def _probe(device: torch.device, dtype: torch.dtype) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    gen = torch.Generator().manual_seed(0)  # never the global RNG: a probe must not shift a run
    best = 0.0
    with torch.no_grad():
        for n in _SIZES:
            a = torch.randn(n, n, generator=gen).to(device, dtype)
            b = torch.randn(n, n, generator=gen).to(device, dtype)
            torch.mm(a, b)  # warm-up: kernels are picked per shape on first use
            sync()
            fastest = float("inf")
            for _ in range(_ROUNDS):
                t0 = time.perf_counter()
                torch.mm(a, b)
                sync()
                fastest = min(fastest, time.perf_counter() - t0)
            best = max(best, 2 * n**3 / fastest)
            if 8 * fastest > _SLOW_S:
                break
    return best
