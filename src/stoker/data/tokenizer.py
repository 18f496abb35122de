"""Byte-level BPE for the built-in corpus, trained once per machine and cached.

The tokenizer is a plain HF ``tokenizers.Tokenizer`` (byte-level pre-tokenizer and decoder, no
normaliser), so ``decode(encode(text).ids) == text`` for any string and no ``[UNK]`` is needed.
Special tokens have fixed ids: ``[PAD]`` = :data:`PAD_ID` = 0, ``[MASK]`` = :data:`MASK_ID` = 1;
the 256 byte tokens and the merges follow.

Both the tokenizer and the tokenized corpus live in :func:`~stoker.data.cache.cache_dir`:

- ``tokenizers/bpe-<vocab>-<key>.json``; the key covers the Python version, the
  :func:`~stoker.data.corpus.corpus_fingerprint`, the vocabulary size, the ``tokenizers``
  version and :data:`_FORMAT_VERSION`.
- ``tokens/<split>-<key>/{ids,offsets}.npy``: every document's ids concatenated (int32) and
  ``offsets[i]:offsets[i+1]`` delimiting document ``i``; memory-mapped on load. The key covers
  the tokenizer's JSON and the corpus fingerprint.

Measured on the dev machine (2 cores, CPython 3.11.7 stdlib without tests, vocab 8,192): the
first run trains the tokenizer in 1.9 s and tokenizes the train split (6,517 documents,
3.14 M tokens) in 2.7 s; later runs load the tokenizer in 0.02 s and the train split in 0.08 s.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import platform
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import tokenizers
from rich.console import Console
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from stoker.data.cache import atomic_write_bytes, cache_dir
from stoker.data.corpus import SPLITS, CorpusConfig, corpus_fingerprint, load_documents
from stoker.errors import StokerError

__all__ = [
    "DEFAULT_VOCAB_SIZE",
    "MASK_ID",
    "PAD_ID",
    "SPECIAL_TOKENS",
    "load_token_documents",
    "load_tokenizer",
    "train_tokenizer",
]

SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[MASK]")
PAD_ID = 0
MASK_ID = 1
DEFAULT_VOCAB_SIZE = 8192
# Bumped whenever training settings or the on-disk layout change (part of every cache key).
_FORMAT_VERSION = 1
# 256 byte tokens + the specials; below this BPE has nothing to merge.
_MIN_VOCAB = 256 + len(SPECIAL_TOKENS)
_MAX_VOCAB = 2**31 - 1  # ids are stored as int32


def _console(progress: bool) -> Console:
    return Console(stderr=True, quiet=not progress)


def train_tokenizer(
    texts: Iterable[str], *, vocab_size: int = DEFAULT_VOCAB_SIZE, length: int | None = None
) -> Tokenizer:
    """Train a byte-level BPE on ``texts`` (no caching; :func:`load_tokenizer` caches).

    ``length`` is the number of texts if known (only used by ``tokenizers`` for bookkeeping).
    """
    if not _MIN_VOCAB <= vocab_size <= _MAX_VOCAB:
        raise StokerError(
            f"vocab_size={vocab_size} is out of range; it must be at least {_MIN_VOCAB} "
            f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens), e.g. {DEFAULT_VOCAB_SIZE}."
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),  # ids 0, 1 in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    if ids != [PAD_ID, MASK_ID]:  # guards against a tokenizers release reordering specials
        raise RuntimeError(f"special tokens got ids {ids}, expected {[PAD_ID, MASK_ID]}")
    return tok


def _tokenizer_path(corpus: CorpusConfig, vocab_size: int) -> Path:
    key = hashlib.sha256(
        f"tok-v{_FORMAT_VERSION}|py{platform.python_version()}|{corpus_fingerprint(corpus)}|"
        f"{vocab_size}|tokenizers{tokenizers.__version__}".encode()
    ).hexdigest()[:16]
    return cache_dir("tokenizers") / f"bpe-{vocab_size}-{key}.json"


def load_tokenizer(
    corpus: CorpusConfig | None = None,
    *,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    progress: bool = True,
) -> Tokenizer:
    """The BPE tokenizer of ``corpus``'s train split: from the cache, or trained and cached.

    ``corpus`` defaults to ``CorpusConfig()`` (the running interpreter's stdlib, no tests).

    Training shows a spinner on stderr (``progress=False`` silences it).
    """
    corpus = corpus if corpus is not None else CorpusConfig()
    path = _tokenizer_path(corpus, vocab_size)
    if path.exists():
        return Tokenizer.from_file(str(path))
    console = _console(progress)
    start = time.perf_counter()
    with console.status(f"Training a {vocab_size}-token byte-level BPE on the corpus..."):
        docs = load_documents("train", corpus)
        tok = train_tokenizer((d.text for d in docs), vocab_size=vocab_size, length=len(docs))
    atomic_write_bytes(path, tok.to_str().encode("utf-8"))
    console.print(
        f"stoker: trained tokenizer ({tok.get_vocab_size()} tokens, {len(docs)} documents) in "
        f"{time.perf_counter() - start:.1f} s -> {path}",
        soft_wrap=True,
    )
    return tok


def _views(ids: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    bounds = offsets.tolist()
    return [ids[a:b] for a, b in itertools.pairwise(bounds)]


def load_token_documents(
    split: str = "train",
    *,
    tokenizer: Tokenizer | None = None,
    corpus: CorpusConfig | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    progress: bool = True,
) -> list[np.ndarray]:
    """Every document of ``split`` as a 1-D int32 array of token ids, cached on disk.

    ``tokenizer`` defaults to :func:`load_tokenizer` ``(corpus, vocab_size=vocab_size)``.
    The arrays are read-only views into one memory-mapped file: copy (``np.array(doc)``)
    before writing to one; collators that stack or concatenate already copy.
    """
    if split not in SPLITS:
        raise StokerError(f"Unknown corpus split {split!r}; valid choices: {', '.join(SPLITS)}.")
    corpus = corpus if corpus is not None else CorpusConfig()
    if tokenizer is None:
        tokenizer = load_tokenizer(corpus, vocab_size=vocab_size, progress=progress)
    key = hashlib.sha256(
        f"tokens-v{_FORMAT_VERSION}|{corpus_fingerprint(corpus)}|{split}|".encode()
        + tokenizer.to_str().encode("utf-8")
    ).hexdigest()[:16]
    entry = cache_dir("tokens") / f"{split}-{key}"
    if (entry / "offsets.npy").exists():
        return _views(np.load(entry / "ids.npy", mmap_mode="r"), np.load(entry / "offsets.npy"))

    console = _console(progress)
    start = time.perf_counter()
    with console.status(f"Tokenizing the {split} split..."):
        docs = load_documents(split, corpus)
        encodings = tokenizer.encode_batch([d.text for d in docs], add_special_tokens=False)
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(docs))
        offsets = np.zeros(len(docs) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.empty(int(offsets[-1]), dtype=np.int32)
        for e, (a, b) in zip(encodings, itertools.pairwise(offsets.tolist()), strict=True):
            ids[a:b] = e.ids
    _write_entry(entry, ids, offsets, meta={"split": split, "documents": len(docs)})
    console.print(
        f"stoker: tokenized {split} split ({len(docs)} documents, {ids.size} tokens) in "
        f"{time.perf_counter() - start:.1f} s -> {entry}",
        soft_wrap=True,
    )
    return _views(np.load(entry / "ids.npy", mmap_mode="r"), offsets)


def _write_entry(entry: Path, ids: np.ndarray, offsets: np.ndarray, meta: dict) -> None:
    """Write the entry into a temporary sibling directory, then rename it into place."""
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}."))
    try:
        np.save(tmp / "ids.npy", ids)
        np.save(tmp / "offsets.npy", offsets)
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            tmp.rename(entry)
        except OSError:
            if not (entry / "offsets.npy").exists():  # not a concurrent writer's win
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
