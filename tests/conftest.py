"""Test-wide settings: run records go to a temporary directory, not into the repository."""

import pytest


@pytest.fixture(autouse=True, scope="session")
def _runs_in_tmp(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("STOKER_RUNS_DIR", str(tmp_path_factory.mktemp("runs")))
    mp.delenv("STOKER_RUN_DIR", raising=False)
    yield
    mp.undo()
