import pytest
import torch

from stoker import Stoker, StokerError
from stoker.runtime.precision import resolve_precision

CPU = torch.device("cpu")


@pytest.mark.parametrize(("speedup", "expected"), [(6.0, "bf16"), (0.02, "fp32"), (1.1, "fp32")])
def test_auto_follows_the_probe(monkeypatch, speedup, expected):
    monkeypatch.setenv("STOKER_BF16_SPEEDUP", str(speedup))
    assert resolve_precision("auto", CPU) == expected
    assert Stoker(device="cpu", record=False, doctor=False).precision == expected


@pytest.mark.parametrize("speedup", ["0.02", "6"])
def test_explicit_bf16_is_kept_and_warned_about_where_slow(monkeypatch, caplog, speedup):
    monkeypatch.setenv("STOKER_BF16_SPEEDUP", speedup)
    with caplog.at_level("WARNING", logger="stoker.runtime.precision"):
        assert resolve_precision("bf16", CPU) == "bf16"
    warned = "expect a slower step than fp32" in caplog.text
    assert warned == (speedup == "0.02")


def test_a_bad_override_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("STOKER_BF16_SPEEDUP", "fast")
    with pytest.raises(StokerError, match="STOKER_BF16_SPEEDUP='fast' is not a positive number"):
        resolve_precision("auto", CPU)


@pytest.mark.parametrize("name", ["fp32", "bf16"])
def test_explicit_precisions_resolve_to_themselves(name):
    assert resolve_precision(name, CPU) == name


@pytest.mark.parametrize("name", ["fp8", "float32", "BF16", ""])
def test_unknown_precision_lists_the_choices(name):
    with pytest.raises(StokerError, match="choose one of fp32, bf16, fp16, auto"):
        resolve_precision(name, CPU)


def test_fp16_on_cpu_is_refused_with_the_alternative():
    with pytest.raises(StokerError, match="bf16"):
        Stoker(device="cpu", precision="fp16")


def test_bf16_forward_runs_in_bf16_and_returns_fp32():
    stoker = Stoker(device="cpu", precision="bf16")
    seen = {}

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(8, 8)

        def forward(self, x):
            y = self.linear(x)
            seen["dtype"] = y.dtype
            return y

    model = stoker.prepare(Probe())
    out = model(torch.randn(2, 8))
    assert seen["dtype"] == torch.bfloat16
    assert out.dtype == torch.float32
    assert model.linear.weight.dtype == torch.float32  # master weights stay fp32


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_prepare_never_patches_the_users_module(precision):
    stoker = Stoker(device="cpu", precision=precision, record=False, doctor=False)
    model = torch.nn.Linear(4, 4)
    prepared = stoker.prepare(model)
    assert "forward" not in vars(model), "the user's forward is its own"
    x = torch.randn(2, 4)
    if precision == "fp32":
        assert torch.equal(prepared(x), model(x))
    assert model(x).dtype == torch.float32 and prepared(x).dtype == torch.float32


def test_prepare_twice_is_refused_in_one_sentence():
    stoker = Stoker(device="cpu", precision="bf16", record=False, doctor=False)
    model = stoker.prepare(torch.nn.Linear(4, 4))
    with pytest.raises(StokerError, match="already prepared"):
        stoker.prepare(model)
