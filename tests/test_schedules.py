import pytest
import torch

from stoker import Stoker, StokerError
from stoker.schedules import one_cycle, warmup_cosine, warmup_stable_decay


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


def _run(make, steps, momentum=0.0):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0, momentum=momentum)
    scheduler = make(optimizer)
    seen = []
    for _ in range(steps):
        group = optimizer.param_groups[0]
        seen.append((group["lr"], group["momentum"]))
        optimizer.step()
        scheduler.step()
    return seen


def test_warmup_stable_decay_worked_example():
    seen = _run(
        lambda o: warmup_stable_decay(o, warmup_steps=2, total_steps=10, decay_fraction=0.4), 12
    )
    expected = [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    assert [lr for lr, _ in seen] == pytest.approx(expected)


def test_one_cycle_worked_example_and_momentum():
    def make(o, cycle_momentum=False):
        return one_cycle(
            o,
            total_steps=5,
            warmup_fraction=0.4,
            start_ratio=0.5,
            end_ratio=0.1,
            cycle_momentum=cycle_momentum,
        )

    assert [lr for lr, _ in _run(make, 5)] == pytest.approx([0.5, 1.0, 0.775, 0.325, 0.1])
    momenta = [m for _, m in _run(lambda o: make(o, cycle_momentum=True), 5, momentum=0.9)]
    assert momenta == pytest.approx([0.95, 0.85, 0.875, 0.925, 0.95])


@pytest.mark.parametrize(
    "make",
    [
        lambda o: warmup_cosine(o, warmup_steps=3, total_steps=12),
        lambda o: warmup_stable_decay(o, warmup_steps=3, total_steps=12),
        lambda o: one_cycle(o, total_steps=12, cycle_momentum=True),
    ],
    ids=["warmup_cosine", "warmup_stable_decay", "one_cycle"],
)
def test_schedules_step_per_optimizer_step_and_resume_exactly(make, tmp_path):
    """Under accumulation a prepared scheduler moves once per optimizer step; a scheduler
    rebuilt from a mid-schedule state_dict goes on with the same values."""
    stoker = Stoker(device="cpu", precision="fp32", record=False, accumulation_steps=4)
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
    model, optimizer, scheduler = stoker.prepare(model, optimizer, scheduler=make(optimizer))
    lrs = []
    for _ in range(5 * 4):  # 5 optimizer steps of 4 micro-batches
        with stoker.accumulate(model):
            stoker.backward(model(torch.ones(1, 2)).sum())
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        lrs.append(optimizer.param_groups[0]["lr"])
    stoker.close()
    direct = _run(make, 12, momentum=0.9)
    assert lrs[3::4] == pytest.approx([lr for lr, _ in direct[1:6]])

    whole = _run(make, 12, momentum=0.9)
    first = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0, momentum=0.9)
    sched = make(first)
    for _ in range(5):
        first.step()
        sched.step()
    saved = sched.state_dict(), first.state_dict()
    second = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0, momentum=0.9)
    resumed = make(second)
    second.load_state_dict(saved[1])
    resumed.load_state_dict(saved[0])
    rest = []
    for _ in range(7):
        group = second.param_groups[0]
        rest.append((group["lr"], group["momentum"]))
        second.step()
        resumed.step()
    assert rest == whole[5:]
