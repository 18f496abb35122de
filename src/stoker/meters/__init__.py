"""Meters: the FLOPs a step runs, the FLOP/s the hardware can reach, and MFU between them."""

from stoker.meters.flops import count_flops
from stoker.meters.peak import DENSE_TFLOPS, PeakFlops, peak_flops
from stoker.meters.utilization import mfu

__all__ = ["DENSE_TFLOPS", "PeakFlops", "count_flops", "mfu", "peak_flops"]
