"""Meters: the FLOPs a step runs, the FLOP/s the hardware can reach, MFU between them, and
the live meters a :class:`~stoker.Stoker` attaches to a run (:class:`StepMeters`)."""

from stoker.meters.flops import count_flops
from stoker.meters.live import MetersConfig, StepMeters, peak_memory
from stoker.meters.peak import DENSE_TFLOPS, PeakFlops, peak_flops
from stoker.meters.utilization import mfu

__all__ = [
    "DENSE_TFLOPS",
    "MetersConfig",
    "PeakFlops",
    "StepMeters",
    "count_flops",
    "mfu",
    "peak_flops",
    "peak_memory",
]
