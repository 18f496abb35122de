import doctest

import pytest

import stoker.checkpoint.store


@pytest.mark.parametrize("module", [stoker.checkpoint.store])
def test_docstring_examples_run(module, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
