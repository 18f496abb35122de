from pathlib import Path

import pytest
import torch

from stoker import Stoker, StokerError
from stoker.runtime.precision import has_fast_bf16, resolve_precision

CPU = torch.device("cpu")


def test_auto_follows_the_hardware():
    expected = "bf16" if has_fast_bf16(CPU) else "fp32"
    assert resolve_precision("auto", CPU) == expected


def test_this_machine_has_fast_bf16():
    # The development and CI machines are AMX Xeons; if this fails, `auto` silently fell back
    # to fp32 and every bf16 number in the README is stale.
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text() if cpuinfo.exists() else ""
    if "amx_bf16" not in flags and "avx512_bf16" not in flags:
        pytest.skip("not an AMX / AVX512-BF16 CPU")
    assert has_fast_bf16(CPU)


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


def test_fp32_leaves_forward_alone():
    stoker = Stoker(device="cpu", precision="fp32")
    model = torch.nn.Linear(4, 4)
    forward = model.forward
    assert stoker.prepare(model).forward == forward


def test_prepare_twice_does_not_nest_autocast():
    stoker = Stoker(device="cpu", precision="bf16")
    model = stoker.prepare(torch.nn.Linear(4, 4))
    wrapped = model.forward
    assert stoker.prepare(model).forward is wrapped
