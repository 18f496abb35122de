"""Experiments that answer a question end to end on the built-in corpus and write a report.

- ``train_large_then_compress``: do larger models trained for the same wall-clock time, then
  compressed, beat smaller ones (Li et al. 2020) on this machine?
"""

from stoker.experiments.train_large_then_compress import ExperimentConfig, run_experiment

__all__ = ["ExperimentConfig", "run_experiment"]
