"""Data: the built-in stdlib corpus and tokenizer, MLM batches, ragged-data samplers, packing.

Submodules, one concept each: ``corpus`` (documents, stable split), ``tokenizer`` (byte-level
BPE, cached), ``mlm`` (fixed-shape masking, padding collator, loss), ``samplers``
(length-grouped, token-budget and rank-balanced batch samplers), ``packing`` (documents packed
into rows, block-diagonal attention), ``seqlen`` (sequence-length warm-up), ``resize``
(progressive resizing of images), ``accounting`` (padding and rank-imbalance metrics),
``loaders`` (the MLM job's DataLoader).
"""

from stoker.data.accounting import RaggedSummary, TokenCounter, summarize_counts, summarize_plan
from stoker.data.corpus import CorpusConfig, Document, load_documents
from stoker.data.loaders import mlm_loader, model_inputs
from stoker.data.mlm import MLMCollator, chunk_documents, mlm_accuracy, mlm_loss, pad_batch
from stoker.data.packing import (
    PackedBatchSampler,
    PackingCollator,
    PackingConfig,
    block_diagonal_mask,
    pack_rows,
)
from stoker.data.resize import ProgressiveResize
from stoker.data.samplers import LengthGroupedBatchSampler, TokenBudgetBatchSampler
from stoker.data.seqlen import RowDocuments, SequenceLengthWarmup
from stoker.data.tokenizer import load_token_documents, load_tokenizer

__all__ = [
    "CorpusConfig",
    "Document",
    "LengthGroupedBatchSampler",
    "MLMCollator",
    "PackedBatchSampler",
    "PackingCollator",
    "PackingConfig",
    "ProgressiveResize",
    "RaggedSummary",
    "RowDocuments",
    "SequenceLengthWarmup",
    "TokenBudgetBatchSampler",
    "TokenCounter",
    "block_diagonal_mask",
    "chunk_documents",
    "load_documents",
    "load_token_documents",
    "load_tokenizer",
    "mlm_accuracy",
    "mlm_loader",
    "mlm_loss",
    "model_inputs",
    "pack_rows",
    "pad_batch",
    "summarize_counts",
    "summarize_plan",
]
