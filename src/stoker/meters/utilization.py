"""Model FLOPs utilization: the share of the hardware's peak a training step achieves."""

from __future__ import annotations

from stoker.errors import StokerError
from stoker.meters.peak import PeakFlops

__all__ = ["mfu"]


def mfu(flops_per_step: float, step_seconds: float, peak: PeakFlops | float) -> float:
    """``flops_per_step / step_seconds / peak`` (a fraction; 0.4 = 40%).

    >>> mfu(1e12, 0.5, 4e12)
    0.5
    """
    peak_value = peak.flops if isinstance(peak, PeakFlops) else float(peak)
    if not step_seconds > 0 or not peak_value > 0 or flops_per_step < 0:
        raise StokerError(
            f"mfu needs flops_per_step >= 0, step_seconds > 0 and a positive peak; got "
            f"{flops_per_step}, {step_seconds}, {peak_value}"
        )
    return flops_per_step / step_seconds / peak_value
