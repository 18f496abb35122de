"""The training step's one owner: what it counts, scales and finalizes, once per step."""

import sys

import pytest
import torch

import stoker.runtime.stoker as stoker_module
from stoker import Stoker
from stoker.runtime.distributed import DistributedContext
from stoker.runtime.step import StepListener, StepLog, TrainingStep


@pytest.fixture
def fp16_on_cpu(monkeypatch):
    """fp16 is a CUDA recipe; its grad scaler logic is the same on CPU, so allow it here."""
    monkeypatch.setattr(stoker_module, "resolve_precision", lambda name, device: "fp16")
    updates = []
    update = torch.amp.GradScaler.update

    def counted(self, new_scale=None):
        updates.append(self.get_scale())
        return update(self, new_scale)

    monkeypatch.setattr(torch.amp.GradScaler, "update", counted)
    return updates


def _two_halves():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))


def test_fp16_with_two_optimizers_steps_once_and_unscales_each_once(fp16_on_cpu):
    stoker = Stoker(device="cpu", precision="fp16", record=False, doctor=False)
    net = _two_halves()
    reference = _two_halves()
    opt_a = torch.optim.SGD(net[0].parameters(), lr=0.1)
    opt_b = torch.optim.SGD(net[1].parameters(), lr=0.1)
    model, opt_a, opt_b = stoker.prepare(net, opt_a, opt_b)
    x = torch.randn(8, 4)
    stoker.backward(model(x).square().mean())
    opt_a.step()
    opt_b.step()
    assert stoker.step == 1, "two optimizers, one iteration: one step"
    assert len(fp16_on_cpu) == 1, "GradScaler.update() runs once per iteration"
    # What one fp32 SGD step on the true gradients gives (the same fp16 forward).
    ref_a = torch.optim.SGD(reference[0].parameters(), lr=0.1)
    ref_b = torch.optim.SGD(reference[1].parameters(), lr=0.1)
    with torch.autocast("cpu", dtype=torch.float16):
        out = reference(x)
    out.float().square().mean().backward()
    ref_a.step()
    ref_b.step()
    for ours, expected in zip(net.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours, expected, rtol=1e-3, atol=1e-5)
    opt_a.zero_grad()
    opt_b.zero_grad()
    stoker.backward(model(x).square().mean())
    opt_a.step()
    opt_b.step()
    assert stoker.step == 2 and len(fp16_on_cpu) == 2
    stoker.close()


def test_fp16_one_of_two_optimizers_stepped_still_ends_the_step(fp16_on_cpu):
    # A GAN-style loop steps one optimizer per iteration: the step ends at the next backward.
    stoker = Stoker(device="cpu", precision="fp16", record=False, doctor=False)
    net = _two_halves()
    opt_a = torch.optim.SGD(net[0].parameters(), lr=0.1)
    opt_b = torch.optim.SGD(net[1].parameters(), lr=0.1)
    model, opt_a, opt_b = stoker.prepare(net, opt_a, opt_b)
    for i in range(4):
        stoker.backward(model(torch.randn(8, 4)).square().mean())
        (opt_a if i % 2 == 0 else opt_b).step()
        opt_a.zero_grad()
        opt_b.zero_grad()
    stoker.close()
    assert stoker.step == 4 and len(fp16_on_cpu) == 4


class _Recorder(StepListener):
    def __init__(self, name, events, fail_on_close=False):
        self.name, self.events, self.fail_on_close = name, events, fail_on_close

    def on_micro_batch(self, step, live):
        self.events.append((self.name, "micro-batch", step, live))

    def on_step_end(self, step):
        self.events.append((self.name, "step-end", step))

    def close(self, failed):
        self.events.append((self.name, "close", repr(failed) if failed else None))
        if self.fail_on_close:
            raise RuntimeError(f"{self.name} could not close")


def test_listeners_see_each_step_once_and_the_next_micro_batch_once():
    stoker = Stoker(device="cpu", precision="fp32", accumulation_steps=2, record=False)
    model = torch.nn.Linear(4, 1)
    model, optimizer = stoker.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    events = []
    stoker._steps.add_listener(_Recorder("r", events))
    for _ in range(4):  # two windows of two micro-batches
        with stoker.accumulate(model):
            stoker.backward(model(torch.randn(2, 4)).sum())
            optimizer.step()
            optimizer.zero_grad()
    assert events == [
        ("r", "micro-batch", 0, False),
        ("r", "step-end", 1),
        ("r", "micro-batch", 1, False),
        ("r", "step-end", 2),
    ]
    stoker.close()
    assert events[-1] == ("r", "close", None)


class _Sleeper(StepListener):
    """Asks to be called again only at step 1000; rings the alarm itself when told to."""

    def __init__(self, steps: TrainingStep, ring_inside: bool = False) -> None:
        self.steps = steps
        self.ring_inside = ring_inside
        self.calls: list[tuple[str, int]] = []

    def _called(self, what: str, step: int) -> int:
        self.calls.append((what, step))
        if self.ring_inside:  # a signal arriving while the listeners run
            self.ring_inside = False
            self.steps.alarm.ring()
        return 1000

    def on_micro_batch(self, step, live):
        return self._called("micro-batch", step)

    def on_step_end(self, step):
        return self._called("step-end", step)


def _plain_steps(steps: TrainingStep, n: int) -> None:
    for _ in range(n):
        steps.backward(torch.ones((), requires_grad=True))
        steps.step_done()


def test_the_alarm_calls_the_listeners_at_the_next_boundary():
    steps = TrainingStep(accumulation_steps=1, scaler=None, dist=DistributedContext())
    sleeper = _Sleeper(steps)
    steps.add_listener(sleeper)
    _plain_steps(steps, 3)
    assert sleeper.calls == [("micro-batch", 0)]  # then quiet until step 1000
    steps.alarm.ring()  # what the preemption signal handler does
    _plain_steps(steps, 2)
    assert sleeper.calls == [("micro-batch", 0), ("micro-batch", 3)]  # once, then quiet again


def test_an_alarm_rung_while_the_listeners_run_is_not_lost():
    steps = TrainingStep(accumulation_steps=1, scaler=None, dist=DistributedContext())
    sleeper = _Sleeper(steps, ring_inside=True)
    steps.add_listener(sleeper)
    _plain_steps(steps, 3)
    assert sleeper.calls == [("micro-batch", 0), ("step-end", 1)]


def test_listeners_close_last_attached_first_and_hand_on_a_failure():
    steps = TrainingStep(accumulation_steps=1, scaler=None, dist=DistributedContext())
    events = []
    steps.add_listener(_Recorder("first", events))
    steps.add_listener(_Recorder("second", events, fail_on_close=True))
    with pytest.raises(RuntimeError, match="second could not close"):
        steps.close(None)
    assert events == [
        ("second", "close", None),
        ("first", "close", "RuntimeError('second could not close')"),
    ]


def test_a_listener_is_only_called_for_what_it_implements():
    class OnlyClose(StepListener):
        def close(self, failed):
            pass

    steps = TrainingStep(accumulation_steps=1, scaler=None, dist=DistributedContext())
    steps.add_listener(OnlyClose())
    steps.add_listener(_Recorder("r", []))
    assert len(steps._on_step_end) == len(steps._on_micro_batch) == 1


def test_accumulate_skips_the_prepared_models_ddp_sync_until_the_windows_last(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from stoker.runtime.model import PreparedModel

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        user = torch.nn.Linear(4, 1)
        ddp = DistributedDataParallel(user)
        model = PreparedModel(user, ddp, autocast_dtype=None, device_type="cpu")
        steps = TrainingStep(accumulation_steps=2, scaler=None, dist=DistributedContext())
        steps.add_model(user, ddp)
        window = steps.micro_batch
        window.model = model
        seen = []
        for _ in range(4):
            with window:
                seen.append((steps.sync_gradients, ddp.require_backward_grad_sync))
            assert ddp.require_backward_grad_sync  # restored on exit
        assert seen == [(False, False), (True, True)] * 2
    finally:
        dist.destroy_process_group()


def test_a_steady_step_makes_only_the_step_owners_calls(tmp_path, monkeypatch):
    """The per-step path on one process, call by call: the prepared model, backward and the
    optimizer's step, and nothing else of stoker's (the listeners, meters and record are not
    called between their wake-ups: a quiet step). A small model's step time is this path's
    cost."""
    monkeypatch.setenv("STOKER_RUNS_DIR", str(tmp_path))
    stoker = Stoker(device="cpu", precision="fp32", doctor=False)
    net = torch.nn.Linear(4, 1)
    model, opt = stoker.prepare(net, torch.optim.SGD(net.parameters(), lr=0.1))
    x = torch.randn(8, 4)

    def step():
        stoker.backward(model(x).square().mean())
        opt.step()
        opt.zero_grad()

    for _ in range(3):
        step()
    called: list[tuple[str, str]] = []

    def profile(frame, event, arg):
        code = frame.f_code
        if event == "call" and "/stoker/" in code.co_filename:
            called.append((code.co_filename.rsplit("/", 1)[-1], code.co_name))

    sys.setprofile(profile)
    try:
        step()
    finally:
        sys.setprofile(None)
    stoker.close()
    assert called == [
        ("model.py", "__call__"),  # PreparedModel
        ("step.py", "backward"),  # TrainingStep's own: Stoker.backward is it in one process
        ("prepared.py", "step"),  # PreparedOptimizer
        ("step.py", "optimizer_step"),
    ]


class _EveryStep(StepListener):
    """Wants every boundary: no step is quiet while it is attached."""

    def on_step_end(self, step):
        return None


@pytest.mark.parametrize("quiet", [True, False], ids=["quiet-steps", "every-step-listener"])
def test_quiet_steps_train_count_and_log_like_full_ones(quiet):
    stoker = Stoker(device="cpu", precision="fp32", record=False, doctor=False, meters=False)
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 1)
    model, opt = stoker.prepare(net, torch.optim.SGD(net.parameters(), lr=0.1))
    steps = stoker._steps
    steps.step_log = StepLog()
    sleeper = _Sleeper(steps)
    steps.add_listener(sleeper)
    if not quiet:
        steps.add_listener(_EveryStep())
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    seen_quiet = []
    for i in range(6):
        seen_quiet.append(steps._quiet)
        tokens = torch.tensor(8.0) if i == 3 else None  # one token-weighted step in between
        stoker.backward(model(x).square().mean(), tokens=tokens)
        opt.step()
        opt.zero_grad()
        assert (steps.last_tokens is None) == (tokens is None)
    assert any(seen_quiet) == quiet
    assert stoker.step == 6 and len(steps.step_log.ends) == 6
    assert sleeper.calls == [("micro-batch", 0)]  # asked for step 1000: not called again
    steps.alarm.ring()  # a signal in a quiet stretch reaches the listeners at the next boundary
    stoker.backward(model(x).square().mean())
    assert sleeper.calls == [("micro-batch", 0), ("micro-batch", 6)]
    weights = torch.cat([p.detach().flatten() for p in net.parameters()])
    torch.manual_seed(0)
    reference = torch.nn.Linear(4, 1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for _ in range(6):  # token-weighted with the whole batch's count: the same mean loss
        reference(x).square().mean().backward()
        ref_opt.step()
        ref_opt.zero_grad()
    expected = torch.cat([p.detach().flatten() for p in reference.parameters()])
    torch.testing.assert_close(weights, expected)
    stoker.close()


def test_a_listener_due_after_quiet_steps_is_called_at_its_step():
    stoker = Stoker(device="cpu", precision="fp32", record=False, doctor=False, meters=False)
    net = torch.nn.Linear(4, 1)
    model, opt = stoker.prepare(net, torch.optim.SGD(net.parameters(), lr=0.1))

    class WakesAt5(StepListener):
        def __init__(self) -> None:
            self.calls: list[tuple[str, int]] = []

        def on_micro_batch(self, step, live):
            self.calls.append(("micro-batch", step))
            return 5

        def on_step_end(self, step):
            self.calls.append(("step-end", step))
            return 5 if step < 5 else 1000

    listener = WakesAt5()
    stoker._steps.add_listener(listener)
    for _ in range(8):
        stoker.backward(model(torch.randn(2, 4)).sum())
        opt.step()
        opt.zero_grad()
    assert listener.calls == [("micro-batch", 0), ("step-end", 5)]
    stoker.close()


def test_an_optimizer_prepared_after_quiet_steps_joins_the_step():
    stoker = Stoker(device="cpu", precision="fp32", record=False, doctor=False, meters=False)
    net = torch.nn.Linear(4, 1)
    model, first = stoker.prepare(net, torch.optim.SGD(net.parameters(), lr=0.1))
    for _ in range(3):
        stoker.backward(model(torch.randn(2, 4)).sum())
        first.step()
        first.zero_grad()
    assert stoker._steps._quiet and stoker.step == 3
    head = torch.nn.Linear(1, 1)
    head, second = stoker.prepare(head, torch.optim.SGD(head.parameters(), lr=0.1))
    for _ in range(2):  # one step per iteration: it ends once both optimizers stepped
        stoker.backward(head(model(torch.randn(2, 4))).sum())
        first.step()
        assert stoker.step == 3 + _
        second.step()
        first.zero_grad()
        second.zero_grad()
    assert stoker.step == 5
    stoker.close()
