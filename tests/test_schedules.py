import pytest
import torch

from stoker import StokerError
from stoker.schedules import warmup_cosine


def _lrs(steps, **kwargs):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = warmup_cosine(optimizer, **kwargs)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_worked_example_from_the_docstring():
    lrs = _lrs(7, warmup_steps=2, total_steps=6, min_ratio=0.0)
    expected = [0.5, 1.0, 1.0, 0.8535534, 0.5, 0.1464466, 0.0]
    assert lrs == pytest.approx(expected, abs=1e-6)


def test_never_below_the_floor():
    assert min(_lrs(50, warmup_steps=5, total_steps=20, min_ratio=0.1)) == pytest.approx(0.1)


@pytest.mark.parametrize(("warmup", "total"), [(5, 4), (-1, 10), (0, 0)])
def test_bad_lengths(warmup, total):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(StokerError, match="warmup_steps"):
        warmup_cosine(optimizer, warmup_steps=warmup, total_steps=total)


def test_total_steps_may_be_decided_later():
    plan = {"steps": 100}
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, warmup_steps=2, total_steps=lambda: plan["steps"], min_ratio=0.0)
    for _ in range(2):
        opt.step()
        sched.step()
    plan["steps"] = 6  # decided during warm-up: the decay now spans steps 2-6
    factors = []
    for _ in range(4):
        opt.step()
        sched.step()
        factors.append(opt.param_groups[0]["lr"])
    assert [round(f, 2) for f in factors] == [0.85, 0.5, 0.15, 0.0]
