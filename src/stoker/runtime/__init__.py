"""The runtime: device, precision, distributed wrapping and the training step."""

from stoker.runtime.device import resolve_device
from stoker.runtime.precision import PRECISIONS, PrecisionPolicy, has_fast_bf16, resolve_precision
from stoker.runtime.prepared import PreparedLoader, PreparedOptimizer, PreparedScheduler
from stoker.runtime.stoker import Stoker

__all__ = [
    "PRECISIONS",
    "PrecisionPolicy",
    "PreparedLoader",
    "PreparedOptimizer",
    "PreparedScheduler",
    "Stoker",
    "has_fast_bf16",
    "resolve_device",
    "resolve_precision",
]
