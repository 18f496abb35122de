"""stoker: keeps your accelerator fed.

Building blocks for PyTorch training loops you own. Importing stoker does nothing but import:
no device is initialised, no environment variable or logging handler is touched.
"""

from stoker.errors import PREEMPTED_EXIT_CODE, StokerError
from stoker.runtime import PreemptionConfig, Stoker
from stoker.runtime.strategy import FSDPConfig
from stoker.runtime.tracked import Variables

__version__ = "0.1.0"

__all__ = [
    "PREEMPTED_EXIT_CODE",
    "FSDPConfig",
    "PreemptionConfig",
    "Stoker",
    "StokerError",
    "Variables",
    "__version__",
]
