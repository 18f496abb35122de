"""The training step's one owner: what it counts, scales and finalizes, once per step."""

import pytest
import torch

import stoker.runtime.stoker as stoker_module
from stoker import Stoker


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
