"""The runtime: device, precision, distributed wrapping and the training step."""

from stoker.runtime.device import resolve_device
from stoker.runtime.hardware import MatmulSpeed, bf16_is_fast, matmul_speed
from stoker.runtime.precision import PRECISIONS, PrecisionPolicy, resolve_precision
from stoker.runtime.preemption import PreemptionConfig
from stoker.runtime.prepared import PreparedLoader, PreparedOptimizer, PreparedScheduler
from stoker.runtime.stoker import Stoker

__all__ = [
    "PRECISIONS",
    "MatmulSpeed",
    "PrecisionPolicy",
    "PreemptionConfig",
    "PreparedLoader",
    "PreparedOptimizer",
    "PreparedScheduler",
    "Stoker",
    "bf16_is_fast",
    "matmul_speed",
    "resolve_device",
    "resolve_precision",
]
