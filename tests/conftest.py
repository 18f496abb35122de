"""Test-wide settings: run records go to a temporary directory, not into the repository, and
the runtime's doctor is off unless a test turns it on (its probes would time every test)."""

import pytest


@pytest.fixture(autouse=True, scope="session")
def _runs_in_tmp(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("STOKER_RUNS_DIR", str(tmp_path_factory.mktemp("runs")))
    mp.delenv("STOKER_RUN_DIR", raising=False)
    mp.setenv("STOKER_DOCTOR", "0")
    yield
    mp.undo()
