"""BERT-style masked-language-model batches with fixed shapes, and the loss and baseline.

Masking picks a FIXED number ``M = ceil(rate * T)`` of positions per row, so every tensor has a
static shape: no boolean indexing, no ``nonzero``, nothing that makes the host wait for the
device, and the model gathers just those ``M`` hidden states before its vocabulary projection
(``Encoder(..., predict_positions=...)``). Rows with fewer than ``M`` valid tokens label their
extra slots -100 (ignored by the loss). Of the chosen tokens 80% become ``[MASK]``, 10% a random
non-special token, 10% stay unchanged (Devlin et al. 2019, section 3.1).

A batch is built in two steps, both on CPU in DataLoader workers:

1. a *layout* collator turns ``list[np.ndarray]`` (token ids per document) into tensors with at
   least ``input_ids`` [B, T] long and ``valid`` [B, T] bool: :func:`pad_batch` here, or the
   packing collator in :mod:`stoker.data.packing`;
2. :class:`MLMCollator` wraps it and adds ``input_ids`` (masked), ``predict_positions`` [B, M]
   and ``labels`` [B, M].

Example::

    collate = MLMCollator(functools.partial(pad_batch, max_len=128), vocab_size=8192, seed=0)
    loader = DataLoader(chunk_documents(docs, 128), batch_size=32, collate_fn=collate)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from stoker.data.tokenizer import MASK_ID, PAD_ID, SPECIAL_TOKENS
from stoker.errors import StokerError

__all__ = [
    "IGNORE_INDEX",
    "MLMCollator",
    "UnigramBaseline",
    "chunk_documents",
    "mask_tokens",
    "mlm_accuracy",
    "mlm_loss",
    "num_predictions",
    "pad_batch",
    "unigram_baseline",
]

IGNORE_INDEX = -100  # label of a prediction slot that does not count (F.cross_entropy default)


def num_predictions(seq_len: int, rate: float = 0.15) -> int:
    """``M = ceil(rate * seq_len)``: prediction slots per row (e.g. 20 for T=128, rate 0.15)."""
    return math.ceil(rate * seq_len)


def mask_tokens(
    input_ids: Tensor,
    valid: Tensor,
    *,
    vocab_size: int,
    rate: float = 0.15,
    mask_id: int = MASK_ID,
    random_low: int = len(SPECIAL_TOKENS),
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Choose ``M = ceil(rate*T)`` distinct valid positions per row and corrupt them BERT-style.

    Args:
        input_ids: [B, T] long token ids (not modified).
        valid: [B, T] bool, True for real tokens (only these are ever chosen).
        vocab_size: random replacements are drawn from ``[random_low, vocab_size)``.
        generator: on the same device as ``input_ids``; seeds everything random here.

    Returns:
        ``(masked_input_ids [B, T], predict_positions [B, M] long, labels [B, M] long)``;
        positions are sorted ascending per row; ``labels`` holds the original ids at those
        positions, or -100 for slots beyond a row's number of valid tokens.
    """
    if input_ids.dim() != 2 or valid.shape != input_ids.shape:
        raise StokerError(
            f"mask_tokens wants input_ids and valid of the same shape [B, T]; got "
            f"{tuple(input_ids.shape)} and {tuple(valid.shape)}."
        )
    if not 0.0 < rate <= 1.0:
        raise StokerError(f"mask rate={rate} must be in (0, 1]; BERT uses 0.15.")
    if not 0 <= random_low < vocab_size:
        raise StokerError(f"random_low={random_low} must be in [0, vocab_size={vocab_size}).")
    b, t = input_ids.shape
    m = num_predictions(t, rate)
    dev = input_ids.device
    # Random scores in [0, 1) for valid tokens, -1 for padding: the top M are M distinct valid
    # positions whenever the row has >= M of them, and include every valid one otherwise.
    scores = torch.rand(b, t, generator=generator, device=dev).masked_fill(~valid, -1.0)
    positions = scores.topk(m, dim=1, sorted=False).indices.sort(dim=1).values  # [B, M]
    chosen_valid = valid.gather(1, positions)  # [B, M] False only for overflow slots
    original = input_ids.gather(1, positions)  # [B, M]
    labels = original.masked_fill(~chosen_valid, IGNORE_INDEX)

    u = torch.rand(b, m, generator=generator, device=dev)
    random_ids = torch.randint(
        random_low, vocab_size, (b, m), generator=generator, device=dev, dtype=input_ids.dtype
    )
    replacement = torch.where(
        u < 0.8,
        torch.full_like(original, mask_id),
        torch.where(u < 0.9, random_ids, original),
    )
    replacement = torch.where(chosen_valid, replacement, original)  # overflow slots untouched
    masked = input_ids.scatter(1, positions, replacement)  # positions are distinct per row
    return masked, positions, labels


def pad_batch(docs: Sequence[np.ndarray], max_len: int, pad_id: int = PAD_ID) -> dict[str, Tensor]:
    """Layout collator: right-pad to the longest document (truncating at ``max_len``).

    Returns ``input_ids`` [B, T] long, ``valid`` [B, T] bool and ``attention_mask`` (the same
    tensor as ``valid``), with ``T = min(max_len, longest document)``. Use with
    ``functools.partial(pad_batch, max_len=...)``.
    """
    if max_len < 1:
        raise StokerError(f"pad_batch max_len={max_len} must be >= 1.")
    if len(docs) == 0:
        raise StokerError("pad_batch got an empty batch; check the sampler / batch size.")
    lengths = [min(len(d), max_len) for d in docs]
    t = max(max(lengths), 1)
    ids = np.full((len(docs), t), pad_id, dtype=np.int64)
    for row, (doc, n) in enumerate(zip(docs, lengths, strict=True)):
        ids[row, :n] = doc[:n]
    valid = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]
    return {"input_ids": torch.from_numpy(ids), "valid": valid, "attention_mask": valid}


def chunk_documents(
    docs: Sequence[np.ndarray], max_len: int, *, min_len: int = 4
) -> list[np.ndarray]:
    """Cut every document into consecutive pieces of at most ``max_len`` tokens.

    Pieces shorter than ``min_len`` (a document's short tail, or a tiny document) are dropped:
    with 15% masking they would carry no prediction. Pieces are views, not copies. For
    ``max_len=4, min_len=2``: ``[0 1 2 3 4 5 6 7 8]`` gives ``[0 1 2 3], [4 5 6 7]`` (``[8]``
    is dropped).
    """
    if max_len < 1 or not 1 <= min_len <= max_len:
        raise StokerError(
            f"chunk_documents needs max_len >= 1 and 1 <= min_len <= max_len; got "
            f"max_len={max_len}, min_len={min_len}."
        )
    pieces = []
    for doc in docs:
        for start in range(0, len(doc), max_len):
            piece = doc[start : start + max_len]
            if len(piece) >= min_len:
                pieces.append(piece)
    return pieces


class MLMCollator:
    """Wrap a layout collator and add masked ``input_ids``, ``predict_positions``, ``labels``.

    The original ids are dropped (they are recoverable from ``labels``); every other key of the
    layout's output passes through. Randomness comes from a generator owned by the collator,
    seeded from ``(seed, epoch, DataLoader worker id)``: the same seed, epoch and
    ``num_workers`` give the same batches. Call :meth:`set_epoch` before each epoch (as with
    ``DistributedSampler``) so that non-persistent workers don't repeat last epoch's masks.
    Under data parallelism give each rank its own stream: ``seed=base_seed + rank``.
    """

    def __init__(
        self,
        layout: Callable[[list[np.ndarray]], dict[str, Tensor]],
        *,
        vocab_size: int,
        rate: float = 0.15,
        mask_id: int = MASK_ID,
        seed: int = 0,
    ) -> None:
        if seed < 0:
            raise StokerError(f"MLMCollator seed={seed} must be >= 0.")
        if not 0.0 < rate <= 1.0:
            raise StokerError(f"MLMCollator rate={rate} must be in (0, 1]; BERT uses 0.15.")
        self.layout = layout
        self.vocab_size = vocab_size
        self.rate = rate
        self.mask_id = mask_id
        self.seed = seed
        self.epoch = 0
        self._generator: torch.Generator | None = None
        self._stream: tuple[int, int] | None = None  # (epoch, worker id) the generator is for

    def set_epoch(self, epoch: int) -> None:
        """Select the random stream of ``epoch`` (takes effect at the next batch)."""
        if epoch < 0:
            raise StokerError(f"MLMCollator.set_epoch({epoch}): epoch must be >= 0.")
        self.epoch = epoch

    def _rng(self) -> torch.Generator:
        info = torch.utils.data.get_worker_info()
        stream = (self.epoch, info.id if info is not None else -1)
        if self._generator is None or self._stream != stream:
            # Distinct 63-bit seeds per (seed, epoch, worker); SeedSequence mixes them well.
            entropy = [self.seed, self.epoch, stream[1] + 1]
            state = np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)
            self._generator = torch.Generator().manual_seed(int(state[0]) & (2**63 - 1))
            self._stream = stream
        return self._generator

    def __call__(self, docs: list[np.ndarray]) -> dict[str, Tensor]:
        batch = dict(self.layout(docs))
        for key in ("input_ids", "valid"):
            if key not in batch:
                raise StokerError(
                    f"MLMCollator's layout collator returned keys {sorted(batch)}; it must "
                    f"return {key!r} (use pad_batch or the packing collator)."
                )
        masked, positions, labels = mask_tokens(
            batch["input_ids"],
            batch["valid"],
            vocab_size=self.vocab_size,
            rate=self.rate,
            mask_id=self.mask_id,
            generator=self._rng(),
        )
        batch.update(input_ids=masked, predict_positions=positions, labels=labels)
        return batch


def mlm_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy over the counted slots, and their number (a device tensor, no sync).

    ``logits`` [B, M, V] (any float dtype; computed in fp32), ``labels`` [B, M] with -100 for
    slots that don't count. A batch with no counted slot gives loss 0, not NaN. Pass the count
    as ``tokens=`` to ``stoker.backward`` for token-weighted gradient accumulation.
    """
    flat_labels = labels.reshape(-1)
    total = F.cross_entropy(
        logits.reshape(flat_labels.numel(), -1).float(),
        flat_labels,
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    count = (flat_labels != IGNORE_INDEX).sum()
    return total / count.clamp_min(1), count


def mlm_accuracy(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """``(correct, counted)`` top-1 predictions over the counted slots, as device tensors."""
    counted = labels != IGNORE_INDEX
    correct = (logits.argmax(dim=-1) == labels) & counted
    return correct.sum(), counted.sum()


@dataclass(frozen=True, slots=True)
class UnigramBaseline:
    """What a model that ignores context achieves; a trained MLM must clearly beat it."""

    token_id: int
    """The most frequent non-special token of the train split."""
    accuracy: float
    """Fraction of validation tokens equal to ``token_id`` (expected masked-token accuracy)."""
    loss: float
    """Cross-entropy (nats) of the train unigram distribution (add-one smoothed) on validation."""


def unigram_baseline(
    train: Sequence[np.ndarray],
    validation: Sequence[np.ndarray],
    *,
    vocab_size: int,
    num_special: int = len(SPECIAL_TOKENS),
) -> UnigramBaseline:
    """Accuracy and loss of always predicting from train-split token frequencies alone.

    Masked positions are sampled uniformly among valid tokens, so the expected accuracy of the
    constant prediction is the share of that token among all validation tokens.
    """
    train_counts = np.bincount(np.concatenate(list(train)), minlength=vocab_size)[:vocab_size]
    val_counts = np.bincount(np.concatenate(list(validation)), minlength=vocab_size)[:vocab_size]
    train_counts[:num_special] = 0  # never the target of a prediction
    token = int(train_counts.argmax())
    total_val = int(val_counts.sum())
    if total_val == 0:
        raise StokerError("unigram_baseline got an empty validation set; check the split.")
    probs = (train_counts + 1.0) / (train_counts.sum() + vocab_size)
    loss = float(-(val_counts * np.log(probs)).sum() / total_val)
    return UnigramBaseline(token, float(val_counts[token]) / total_val, loss)
