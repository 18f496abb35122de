"""Finders measured on the user's own step: learning rate, batch size, threads.

Each is a function (usable in your own code) and a ``stoker tune`` subcommand; each is bounded
in time, shows a progress bar, and puts the model and optimizer back as they were.

- :func:`find_lr`: LR range test, suggests a one-cycle peak.
- :func:`find_batch_size`: samples/s over batch sizes, survives out-of-memory, scales the LR.
- :func:`find_threads`: step time over intra-op threads x DataLoader workers.
- :func:`tune_lr`, :func:`tune_batch_size`, :func:`tune_threads`: the same on a *tune job*
  (:mod:`stoker.tune.job`; :class:`MLMJob` is the built-in one).
"""

from stoker.tune.batch_size import BatchSizeResult, BatchSizeTrial, find_batch_size, scale_lr
from stoker.tune.job import MLMJob, TuneJob, load_job, tune_batch_size, tune_lr, tune_threads
from stoker.tune.lr import LRRangeResult, find_lr
from stoker.tune.threads import ThreadsResult, ThreadsTrial, find_threads

__all__ = [
    "BatchSizeResult",
    "BatchSizeTrial",
    "LRRangeResult",
    "MLMJob",
    "ThreadsResult",
    "ThreadsTrial",
    "TuneJob",
    "find_batch_size",
    "find_lr",
    "find_threads",
    "load_job",
    "scale_lr",
    "tune_batch_size",
    "tune_lr",
    "tune_threads",
]
