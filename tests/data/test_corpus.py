"""Corpus splitting, the train/validation split, the cache dir and the tokenizer cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stoker.data.cache import cache_dir
from stoker.data.corpus import (
    CorpusConfig,
    corpus_files,
    corpus_fingerprint,
    is_validation_path,
    load_documents,
    split_source,
)
from stoker.data.tokenizer import (
    MASK_ID,
    PAD_ID,
    load_token_documents,
    load_tokenizer,
)
from stoker.errors import StokerError

SOURCE = '''"""Module docstring."""
import os

X = 1


@decorator
@other.decorator(
    arg=1,
)
def decorated(a):
    return a

Y = 2  # module code after a def belongs to it


async def coroutine():
    await thing()


class Klass(Base):
    def method(self):
        def inner():
            pass
        return inner

if __name__ == "__main__":
    main()
'''


def test_split_source_cuts_before_definitions_and_keeps_decorators():
    chunks = split_source(SOURCE)
    assert "".join(chunks) == SOURCE  # lossless
    assert len(chunks) == 4
    header, decorated, coroutine, klass = chunks
    assert header.startswith('"""Module docstring."""') and "X = 1" in header
    assert decorated.startswith("@decorator\n@other.decorator(\n")
    assert "def decorated(a):" in decorated and "Y = 2" in decorated
    assert coroutine.startswith("async def coroutine():")
    assert klass.startswith("class Klass(Base):")
    assert "def inner" in klass and 'if __name__ == "__main__"' in klass


def test_split_source_file_starting_with_a_definition_has_empty_header():
    chunks = split_source("def f():\n    pass\ndef g():\n    pass\n")
    assert chunks == ["", "def f():\n    pass\n", "def g():\n    pass\n"]


def test_split_source_does_not_cut_at_lookalikes():
    text = "definitely = 1\nclassic = 2\nif x:\n    def indented(): pass\n"
    # "definitely"/"classic" are not keywords followed by a space; indented defs don't count.
    assert split_source(text) == [text]


def test_split_is_stable_and_about_two_percent():
    paths = [f"pkg{i // 50}/module_{i}.py" for i in range(5000)]
    first = [is_validation_path(p) for p in paths]
    assert first == [is_validation_path(p) for p in paths]  # deterministic (not hash())
    assert 0.015 < sum(first) / len(paths) < 0.025
    # Values computed once with SHA-256: the split must never change across machines.
    assert is_validation_path("copyreg.py") and is_validation_path("json/__init__.py") is False
    assert not is_validation_path("x.py", fraction=0.0)


def _write_tree(root: Path) -> None:
    (root / "pkg").mkdir()
    (root / "test").mkdir()
    (root / "site-packages").mkdir()
    for i in range(40):
        (root / "pkg" / f"mod{i}.py").write_text(
            f'"""Module {i}."""\nimport os\n\n\ndef func_{i}(a, b):\n    return a + b * {i}\n\n\n'
            f"class Thing{i}:\n    def method(self):\n        return 'value {i}'\n"
        )
    (root / "test" / "test_x.py").write_text("def test_x():\n    assert True\n")
    (root / "site-packages" / "foreign.py").write_text("def foreign(): pass\n")
    (root / "latin.py").write_bytes(b"# -*- coding: latin-1 -*-\ns = '\xe9t\xe9'\n")


def test_load_documents_on_a_tree(tmp_path: Path):
    _write_tree(tmp_path)
    config = CorpusConfig(root=str(tmp_path), validation_fraction=0.2)
    train, val = load_documents("train", config), load_documents("validation", config)
    rels = {r for r, _ in corpus_files(config)}
    assert "test/test_x.py" not in rels and "site-packages/foreign.py" not in rels
    assert "test/test_x.py" in {
        r for r, _ in corpus_files(CorpusConfig(root=str(tmp_path), include_tests=True))
    }
    assert {d.path for d in train}.isdisjoint({d.path for d in val})
    assert len(train) + len(val) == 40 * 3 + 1
    assert any(d.text == "# -*- coding: latin-1 -*-\ns = 'été'\n" for d in train + val)
    doc = next(d for d in train + val if d.path == "pkg/mod3.py" and d.index == 1)
    assert doc.text == "def func_3(a, b):\n    return a + b * 3\n"


def test_fingerprint_changes_with_content(tmp_path: Path):
    _write_tree(tmp_path)
    config = CorpusConfig(root=str(tmp_path))
    before = corpus_fingerprint(config)
    assert before == corpus_fingerprint(config)
    (tmp_path / "pkg" / "mod0.py").write_text("def changed():\n    pass\n")
    assert corpus_fingerprint(config) != before


def test_missing_sources_and_bad_input_raise_stoker_error(tmp_path: Path):
    with pytest.raises(StokerError, match="root="):
        corpus_files(CorpusConfig(root=str(tmp_path)))
    with pytest.raises(StokerError, match="valid choices: train, validation"):
        load_documents("test", CorpusConfig(root=str(tmp_path)))
    with pytest.raises(StokerError, match="validation_fraction"):
        CorpusConfig(validation_fraction=1.5)


def test_cache_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("STOKER_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("STOKER_CACHE")
    assert cache_dir("tokens") == tmp_path / "xdg" / "stoker" / "tokens"
    assert (tmp_path / "xdg" / "stoker" / "tokens").is_dir()


def test_tokenizer_round_trip_special_ids_and_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("STOKER_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "src"
    src.mkdir()
    _write_tree(src)
    config = CorpusConfig(root=str(src), validation_fraction=0.2)

    tok = load_tokenizer(config, vocab_size=300, progress=False)
    assert tok.token_to_id("[PAD]") == PAD_ID == 0
    assert tok.token_to_id("[MASK]") == MASK_ID == 1
    assert tok.get_vocab_size() == 300
    text = "def f(x):\n\treturn x + 'ünïcode ✓'  # comment\n"
    assert tok.decode(tok.encode(text).ids) == text
    assert PAD_ID not in tok.encode(text).ids and MASK_ID not in tok.encode(text).ids

    cached = list((tmp_path / "cache" / "tokenizers").glob("bpe-300-*.json"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    again = load_tokenizer(config, vocab_size=300, progress=False)  # cache hit: no retraining
    assert cached[0].stat().st_mtime_ns == mtime and again.to_str() == tok.to_str()
    assert list((tmp_path / "cache" / "tokenizers").glob(".*")) == []  # no temp files left

    docs = load_token_documents("train", tokenizer=tok, corpus=config, progress=False)
    texts = [d.text for d in load_documents("train", config)]
    assert len(docs) == len(texts)
    assert all(d.dtype == np.int32 for d in docs)
    assert [tok.decode(d.tolist()) for d in docs] == texts
    cached_docs = load_token_documents("train", tokenizer=tok, corpus=config, progress=False)
    assert isinstance(cached_docs[0].base, np.memmap) or isinstance(cached_docs[0], np.memmap)
    assert all(np.array_equal(a, b) for a, b in zip(docs, cached_docs, strict=True))
