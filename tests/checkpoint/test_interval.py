"""every="auto": the Young–Daly interval from the measured save cost and step time."""

import doctest
import math

import pytest

import stoker.checkpoint.interval as interval_module
from stoker.checkpoint import CheckpointConfig, Checkpointer
from stoker.checkpoint.interval import AutoInterval, daly_interval, expected_loss
from stoker.errors import StokerError


def test_docstring_example():
    assert doctest.testmod(interval_module).failed == 0


def test_daly_is_young_for_cheap_saves_and_minimises_the_loss():
    save, mtbf = 1.0, 86400.0
    assert daly_interval(save, mtbf) == pytest.approx(math.sqrt(2 * save * mtbf), rel=0.01)
    best = daly_interval(30.0, 900.0)  # a 30 s save, a failure every 15 minutes
    grid = [best * f for f in (0.5, 0.8, 1.25, 2.0)]
    assert all(expected_loss(best, 30.0, 900.0) <= expected_loss(t, 30.0, 900.0) for t in grid)
    assert daly_interval(100.0, 40.0) == 40.0  # saves longer than 2 MTBF: once per MTBF


def test_the_plan_follows_the_measured_costs():
    auto = AutoInterval(mtbf_seconds=2000.0, first_step=10)
    auto.started(0, now=0.0)
    # 10 steps of 1 s, then a save that blocked 10 s: T = daly(10, 2000) ~ 190 s -> 190 steps
    assert auto.saved(10, blocked_seconds=10.0, now=20.0) == 10 + round(daly_interval(10, 2000))
    assert auto.step_seconds == pytest.approx(1.0)
    # steps get 4x slower: the same compute time is a quarter of the steps
    step = auto.next_step
    now = 20.0 + (step - 10) * 4.0 + 10.0
    planned = auto.saved(step, blocked_seconds=10.0, now=now)
    assert planned - step == round(daly_interval(10, 2000) / 4)
    # saves get 16x dearer: the interval grows about 4x (sqrt)
    again = auto.saved(planned, blocked_seconds=160.0, now=now + (planned - step) * 4.0 + 160)
    assert 3.5 < (again - planned) / (planned - step) < 4.5


def test_checkpointer_saves_on_the_plan(tmp_path, monkeypatch):
    clock = {"now": 0.0}
    monkeypatch.setattr(interval_module.time, "monotonic", lambda: clock["now"])
    ckpt = Checkpointer(tmp_path, CheckpointConfig(every="auto", mtbf_hours=1.0))

    def slow_save():  # every save blocks the loop for 10 s of the fake clock
        clock["now"] += 10.0

    ckpt.before_save = slow_save
    state = {"x": {"value": 0}}
    saved = []
    for step in range(1, 1200):
        clock["now"] += 0.5  # a step takes 0.5 s
        if ckpt.maybe_save(step, state):
            saved.append(step)
    every = round(daly_interval(10.0, 3600.0) / 0.5)  # 523 steps
    assert saved == [10, 10 + every, 10 + 2 * every]
    assert ckpt.auto is not None and ckpt.auto.step_seconds == pytest.approx(0.5)
    assert ckpt.auto.save_seconds == pytest.approx(10.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every": "auto"}, "mtbf_hours=None"),
        ({"every": "often", "mtbf_hours": 1}, "every='often'"),
        ({"every": "auto", "mtbf_hours": 1, "every_steps": 5}, "drop every_steps"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(StokerError, match=match):
        CheckpointConfig(**kwargs)
