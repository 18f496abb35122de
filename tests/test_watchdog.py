"""The watchdog: no added sync ops per step, detection within 2 steps, skip keeps weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from stoker.errors import StokerError
from stoker.watchdog import NonFiniteError, Watchdog, WatchdogConfig

SYNC_OPS = ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero")


def _setup(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _train(model, opt, steps: int, watchdog: Watchdog | None = None, bad: dict | None = None):
    """``bad``: {step: "loss"} puts a nan in the input, {step: "grad"} an inf in 2.weight's grad."""
    bad = bad or {}
    state = {"step": 0}
    model[2].weight.register_hook(
        lambda g: g * float("inf") if bad.get(state["step"]) == "grad" else g
    )
    for step in range(1, steps + 1):
        state["step"] = step
        x = torch.randn(8, 16)
        if bad.get(step) == "loss":
            x[0, 0] = float("nan")
        loss = F.mse_loss(model(x), torch.zeros(8, 4))
        if watchdog is not None:
            watchdog.observe(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()


def _sync_ops(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name in SYNC_OPS)


def test_no_added_sync_ops_per_step() -> None:
    model, opt = _setup()
    plain = _sync_ops(lambda: _train(model, opt, 10))
    model, opt = _setup()
    with Watchdog(model, opt) as wd:
        watched = _sync_ops(lambda: _train(model, opt, 10, wd))
        assert wd.verify() and wd.step == 10
    assert watched == plain


@pytest.mark.parametrize("kind,param", [("loss", "0.weight"), ("grad", "2.weight")])
def test_stop_within_two_steps_names_step_and_param(kind: str, param: str) -> None:
    model, opt = _setup()
    wd = Watchdog(model, opt, WatchdogConfig(policy="stop"))
    with pytest.raises(NonFiniteError) as info:
        _train(model, opt, 20, wd, bad={5: kind})
    assert info.value.step == 5 and info.value.param == param
    assert wd.step <= 5 + 2  # raised from the hook of step <= 7, before that update
    assert "non-finite" in str(info.value) and "\n" not in str(info.value)
    assert not wd.healthy and not wd.verify()
    with pytest.raises(NonFiniteError):
        wd.ensure_healthy()
    wd.close()


def test_skip_leaves_weights_untouched_on_the_bad_step() -> None:
    model, opt = _setup()
    wd = Watchdog(model, opt, WatchdogConfig(policy="skip"))
    _train(model, opt, 4, wd)
    before = [p.detach().clone() for p in model.parameters()]
    _train(model, opt, 1, wd, bad={1: "loss"})  # the 5th step: nan loss and gradients
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)
    _train(model, opt, 3, wd)  # training goes on, finite, weights move again
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert wd.verify() and wd.skipped == [5]
    wd.close()


def test_manual_check_without_optimizer() -> None:
    model, opt = _setup()
    wd = Watchdog(model)
    with pytest.raises(NonFiniteError) as info:
        for step in range(1, 10):
            loss = model(torch.full((2, 16), float("nan") if step == 3 else 1.0)).sum()
            loss.backward()
            wd.check(loss)
            opt.step()
            opt.zero_grad()
    assert info.value.step == 3 and wd.step <= 5
    wd.close()


def test_bad_config() -> None:
    with pytest.raises(StokerError, match=r"policy='halt'.*stop, skip"):
        WatchdogConfig(policy="halt")
    model, _ = _setup()
    with pytest.raises(StokerError, match="needs the optimizer"):
        Watchdog(model, config=WatchdogConfig(policy="skip"))


def test_mixed_dtypes_and_missing_grads() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    model[1].to(torch.bfloat16)  # a bf16 layer among fp32 ones
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    wd = Watchdog(model, opt)
    unused = nn.Parameter(torch.zeros(3))  # never gets a gradient
    wd._params.append(unused)
    wd._names.append("unused")
    with pytest.raises(NonFiniteError) as info:
        for step in range(1, 8):
            x = torch.randn(4, 8)
            h = model[1](model[0](x).bfloat16()).float()
            if step == 2:
                h = h * float("inf")
            loss = model[2](h).pow(2).mean()
            wd.observe(loss)
            loss.backward()
            opt.step()
            opt.zero_grad()
    assert info.value.step == 2 and info.value.param == "0.weight"
    wd.close()


def test_docstring_example() -> None:
    import doctest

    import stoker.watchdog

    assert doctest.testmod(stoker.watchdog, raise_on_error=False).failed == 0
