"""Compression of a trained encoder: prune, quantize, save, serve, and measure.

- :func:`compress` with :class:`PruneConfig` / :class:`QuantConfig` → :class:`Compressed`,
  whose ``save`` writes one safetensors file (``artifact``);
- :func:`load_compressed` (``serve``): that file as a callable model, the serving path;
- :func:`choose_quantization` (``auto``): every form measured here, the fastest within an
  accuracy budget kept;
- :func:`evaluate` (``evaluate``): size, latency p50/p99, throughput, accuracy, perplexity;
- the pruning functions (``prune``) work on any module's ``nn.Linear`` layers, except
  :func:`structured_prune`, which reshapes an :class:`~stoker.models.Encoder`;
- :func:`load_trained` (``source``): the encoder of a run or checkpoint.
"""

from stoker.compress.api import Compressed, compress
from stoker.compress.auto import AUTO_CANDIDATES, AutoChoice, choose_quantization, select_form
from stoker.compress.config import PRUNE_METHODS, QUANT_METHODS, PruneConfig, QuantConfig
from stoker.compress.evaluate import Evaluation, evaluate, evaluation_table
from stoker.compress.prune import (
    keep_pruned,
    magnitude_prune,
    prunable_linears,
    semi_structured_prune,
    structured_prune,
)
from stoker.compress.serve import CompressedModel, load_compressed
from stoker.compress.source import TrainedModel, load_trained

__all__ = [
    "AUTO_CANDIDATES",
    "PRUNE_METHODS",
    "QUANT_METHODS",
    "AutoChoice",
    "Compressed",
    "CompressedModel",
    "Evaluation",
    "PruneConfig",
    "QuantConfig",
    "TrainedModel",
    "choose_quantization",
    "compress",
    "evaluate",
    "evaluation_table",
    "keep_pruned",
    "load_compressed",
    "load_trained",
    "magnitude_prune",
    "prunable_linears",
    "select_form",
    "semi_structured_prune",
    "structured_prune",
]
