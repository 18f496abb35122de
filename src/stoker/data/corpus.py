"""The built-in corpus: the Python standard library's own source, one document per definition.

Every machine that runs stoker has it, so the first command trains a real masked-language model
on real, ragged text without downloading anything. The source comes from the running
interpreter (``sysconfig.get_paths()["stdlib"]``), ``*.py`` only. Left out:

- ``site-packages`` (and ``dist-packages``): whatever the user installed, different everywhere;
- ``config-*`` directories and ``_sysconfigdata_*.py``: generated at build time, machine-specific;
- test directories (``test``, ``tests``, ``idle_test``) unless ``include_tests=True``.

Why tests are out by default (measured on the dev machine, CPython 3.11.7): without tests the
corpus is 732 files / 12.1 MB -> 6,616 documents, 3.17 M tokens with the default 8,192-token BPE
(train 6,517 documents / 3,136,290 tokens; validation 16 files, 99 documents, 31,255 tokens).
With tests it is 1,788 files / 31.5 MB. The tiny encoder trains at about 10^4 tokens/s per core,
so a three-minute run sees roughly one pass over the smaller corpus already; more text would go
unseen, while slowing tokenizer training and tokenization ~2.6x, and the test suite is the least
natural code in the library (generated data, deliberately malformed files, legacy encodings).
Document lengths (train, tokens): median 131, p90 906, max 173,790 (``pydoc_data/topics.py`` is
one 757 kB string), so real batches are ragged: cut long ones with ``chunk_documents``.

Documents. A file is cut before every column-0 ``def``, ``async def``, ``class`` or decorator
line; a run of decorators stays with the definition it decorates. Module-level code between two
definitions belongs to the chunk before it; the code before the first definition (docstring,
imports) is the header chunk. For::

    import os            <- document 0 (header)
    @cache               <- document 1
    def f(): ...
    X = 1                <- still document 1
    class C: ...         <- document 2

It is line based on purpose: no ``ast`` (files that do not parse still split) and fast (the
whole 12 MB corpus reads and splits in 0.25 s). A column-0 ``def`` inside a multi-line string
also starts a document; that is rare and harmless.

Split. A file belongs to the validation split iff the first 8 bytes of SHA-256 of its path
relative to the stdlib root (POSIX form), read as a fraction of 2^64, is below
``validation_fraction`` (default 2%). Every document of a file lands in the same split (no
near-duplicate leakage), and the split is the same on every machine and every Python version
that has the file.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import sysconfig
import tokenize
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from stoker.errors import StokerError

__all__ = [
    "SPLITS",
    "CorpusConfig",
    "Document",
    "corpus_files",
    "corpus_fingerprint",
    "is_validation_path",
    "load_documents",
    "split_source",
]

Split = Literal["train", "validation"]
SPLITS: tuple[str, ...] = ("train", "validation")

# Bumped whenever the way files become documents changes (it is part of every cache key).
_FORMAT_VERSION = 1
_TEST_DIRS = frozenset({"test", "tests", "idle_test"})
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
# A definition or a decorator starting in column 0.
_DEF_START = re.compile(r"(?:async[ \t]+def|def|class)[ \t]")


@dataclass(frozen=True, kw_only=True, slots=True)
class CorpusConfig:
    """Which source files make up the corpus and how they are split."""

    root: str | None = None
    """Directory to read ``*.py`` files from; ``None`` means the running interpreter's stdlib."""
    include_tests: bool = False
    """Also read files under ``test``/``tests``/``idle_test`` (31.5 MB instead of 12.1 MB)."""
    validation_fraction: float = 0.02
    """Fraction of *files* (by path hash) held out for validation."""
    min_chars: int = 1
    """Documents shorter than this (characters, surrounding whitespace stripped) are dropped."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.validation_fraction < 1.0:
            raise StokerError(
                f"CorpusConfig.validation_fraction={self.validation_fraction} is outside "
                "[0, 1); pass e.g. 0.02 for 2% of files held out."
            )
        if self.min_chars < 1:
            raise StokerError(f"CorpusConfig.min_chars={self.min_chars} must be >= 1.")

    def resolved_root(self) -> Path:
        """The directory the files are read from."""
        return Path(self.root if self.root is not None else sysconfig.get_paths()["stdlib"])


@dataclass(frozen=True, slots=True)
class Document:
    """One top-level definition (or a file's header) of one source file."""

    path: str
    """Path of the file relative to the corpus root, POSIX form (``"json/decoder.py"``)."""
    index: int
    """Position of this document within its file (0 = first kept chunk)."""
    text: str


def is_validation_path(relative_path: str, fraction: float = 0.02) -> bool:
    """Whether a file (its POSIX path relative to the root) is in the validation split."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def _walk(root: Path, include_tests: bool) -> Iterator[tuple[str, Path]]:
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(
            d
            for d in dirnames
            if d not in _SKIP_DIRS
            and not d.startswith("config-")
            and (include_tests or d not in _TEST_DIRS)
        )
        for name in sorted(filenames):
            if name.endswith(".py") and not name.startswith("_sysconfigdata_"):
                path = here / name
                yield path.relative_to(root).as_posix(), path


def corpus_files(config: CorpusConfig = CorpusConfig()) -> list[tuple[str, Path]]:
    """``(relative POSIX path, absolute path)`` of every corpus file, sorted by relative path.

    Raises :class:`StokerError` if the root has no ``.py`` files (e.g. an interpreter shipped
    with only compiled ``.pyc``), saying to point ``root=`` at a directory of sources.
    """
    root = config.resolved_root()
    files = sorted(_walk(root, config.include_tests)) if root.is_dir() else []
    if not files:
        raise StokerError(
            f"No Python source files (*.py) found under {str(root)!r} "
            f"({'directory has none' if root.is_dir() else 'not a directory'}); this Python may "
            "ship without stdlib sources. Pass CorpusConfig(root='/path/to/python/sources') "
            "(any directory of .py files works, e.g. a CPython checkout's Lib/)."
        )
    return files


def corpus_fingerprint(config: CorpusConfig = CorpusConfig()) -> str:
    """A short hex digest that changes whenever the documents could change.

    Covers the split settings, the splitting format version and every file's relative path,
    size and modification time: a ``stat`` per file, 11 ms for the stdlib, where hashing the
    contents would mean reading all 12 MB on every cached load. A reinstalled stdlib (new
    mtimes) just rebuilds the caches.
    """
    h = hashlib.sha256(
        f"v{_FORMAT_VERSION}|{config.include_tests}|{config.validation_fraction!r}|"
        f"{config.min_chars}".encode()
    )
    for rel, path in corpus_files(config):
        st = path.stat()
        h.update(f"\0{rel}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _read_source(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        # A PEP 263 coding cookie (a few legacy files); latin-1 never fails as a last resort.
        try:
            encoding, _ = tokenize.detect_encoding(iter(raw.splitlines(keepends=True)).__next__)
            text = raw.decode(encoding)
        except (SyntaxError, LookupError, UnicodeDecodeError):
            text = raw.decode("latin-1")
    # Normalise line ends; split on "\n" only (str.splitlines would also cut at \f and \x1c).
    return text.replace("\r\n", "\n").replace("\r", "\n")


def split_source(text: str) -> list[str]:
    """Cut one file's source into chunks, one per top-level definition (see module docstring).

    Returns the chunks in order; concatenated they give back ``text`` exactly. The first chunk
    is the header and may be empty.
    """
    lines = text.split("\n")
    starts = [0]
    in_decorators = False  # inside a run of decorators whose definition hasn't come yet
    for i, line in enumerate(lines):
        if line.startswith("@"):
            if not in_decorators:
                starts.append(i)
                in_decorators = True
        elif _DEF_START.match(line):
            if not in_decorators:
                starts.append(i)
            in_decorators = False
    starts.append(len(lines))
    chunks = []
    for a, b in itertools.pairwise(starts):
        if a == 0 and b == 0:
            chunks.append("")  # header of a file that starts with a definition
            continue
        if a == b:
            continue
        chunk = "\n".join(lines[a:b])
        chunks.append(chunk + "\n" if b < len(lines) else chunk)
    return chunks


def load_documents(
    split: Split | str = "train", config: CorpusConfig = CorpusConfig()
) -> list[Document]:
    """All documents of one split, in file order then position order.

    Each document's text has trailing blank lines removed and ends with one newline.
    """
    if split not in SPLITS:
        raise StokerError(f"Unknown corpus split {split!r}; valid choices: {', '.join(SPLITS)}.")
    want_validation = split == "validation"
    docs: list[Document] = []
    for rel, path in corpus_files(config):
        if is_validation_path(rel, config.validation_fraction) != want_validation:
            continue
        index = 0
        for chunk in split_source(_read_source(path)):
            body = chunk.rstrip()
            if len(body.lstrip()) < config.min_chars:
                continue
            docs.append(Document(rel, index, body + "\n"))
            index += 1
    return docs
