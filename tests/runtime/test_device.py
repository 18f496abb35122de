import pytest
import torch

from stoker import Stoker, StokerError
from stoker.runtime.device import resolve_device


def test_auto_picks_cpu_without_accelerators():
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    assert resolve_device("auto").type in ("cpu", "mps")


def test_missing_cuda_says_what_to_do():
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    with pytest.raises(StokerError, match="device='auto' or device='cpu'"):
        Stoker(device="cuda")


@pytest.mark.parametrize("spec", ["gpu", "tpu:0", "cpu:x"])
def test_nonsense_device_names_are_refused(spec):
    with pytest.raises(StokerError):
        resolve_device(spec)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"accumulation_steps": 0}, "positive integer"),
        ({"accumulation_steps": 1.5}, "positive integer"),
        ({"compile": "yes"}, "True or False"),
    ],
)
def test_bad_settings_are_one_clear_error(kwargs, match):
    with pytest.raises(StokerError, match=match):
        Stoker(device="cpu", **kwargs)


def test_compile_without_a_compiler_is_refused(monkeypatch):
    import stoker.runtime.device as device

    monkeypatch.setattr(device, "_have_cxx_compiler", lambda: False)
    with pytest.raises(StokerError, match="C\\+\\+ compiler"):
        Stoker(device="cpu", compile=True)


def test_prepare_rejects_unknown_objects():
    stoker = Stoker(device="cpu", precision="fp32")
    with pytest.raises(StokerError, match="does not know what to do with a dict"):
        stoker.prepare(torch.nn.Linear(2, 2), {"lr": 1})
