"""Test-wide settings: run records go to a temporary directory, not into the repository, and
the runtime's doctor and end-of-run HTML report are off unless a test turns them on (its
probes would time every test; hundreds of tiny runs need no report)."""

import threading

import pytest


@pytest.fixture(autouse=True, scope="session")
def _runs_in_tmp(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("STOKER_RUNS_DIR", str(tmp_path_factory.mktemp("runs")))
    mp.delenv("STOKER_RUN_DIR", raising=False)
    mp.setenv("STOKER_DOCTOR", "0")
    mp.setenv("STOKER_REPORT", "0")
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _no_flop_counter_left_on_the_thread():
    """A test that drops a Stoker between its first two steps without ``close()`` leaves the
    meters' FLOP counter on this thread (stoker.meters.live counts from the first step's end to
    the second's optimizer step): every later op would be counted, every module call would go
    through its global hooks, and torch.compile would refuse to trace. Exit what a test left,
    newest first, so each test starts as a fresh process would."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
    from torch.utils.flop_counter import FlopCounterMode

    before = len(_get_current_dispatch_mode_stack())
    yield
    stack = _get_current_dispatch_mode_stack()
    while len(stack) > before:
        counter = getattr(stack[-1], "counter", None)
        if not isinstance(counter, FlopCounterMode):
            break  # not the meters' (a test's own mode): leave it for the test to fail on
        counter.__exit__(None, None, None)
        stack = _get_current_dispatch_mode_stack()


def _finishes(fn, seconds=20):
    """``fn()`` run on a thread: its result, or a failure if it is still running after
    ``seconds`` (a reader that blocks on a FIFO would otherwise hang the suite)."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


@pytest.fixture
def finishes():
    return _finishes
