"""The prepared model: a wrapper around the user's module, never a patch of it."""

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from stoker import Stoker
from stoker.records import RecordConfig


class _HasModuleChild(nn.Module):
    """A user model with a child that happens to be called ``module``."""

    def __init__(self):
        super().__init__()
        self.module = nn.Linear(4, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        return self.head(self.module(x))


def test_a_child_named_module_keeps_the_models_own_weights_in_checkpoints(tmp_path):
    stoker = Stoker(device="cpu", precision="fp32", record=RecordConfig(directory=tmp_path / "r"))
    user = _HasModuleChild()
    model, optimizer = stoker.prepare(user, torch.optim.SGD(user.parameters(), lr=0.1))
    assert Stoker.unwrap(model) is user
    assert Stoker.unwrap(user) is user
    stoker.backward(model(torch.randn(2, 4)).sum())
    optimizer.step()
    path = stoker.save_checkpoint()
    stoker.close()
    saved = load_file(path / "model.safetensors")
    assert set(saved) == set(user.state_dict()), sorted(saved)
    torch.testing.assert_close(saved["head.weight"], user.head.weight.detach())


class _Rnn(nn.Module):
    """An LSTM-shaped model: a child, a config, ``init_hidden``, ``(out, (h, c))`` outputs. Its
    cell is a Linear: torch's bf16 LSTM kernel (oneDNN) does not run on CPUs without AVX-512
    (an AMD EPYC Zen 3 here: "could not create a primitive descriptor")."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.Linear(4 + 8, 2 * 8)
        self.config = {"hidden": 8}

    def init_hidden(self, batch):
        return (torch.zeros(1, batch, 8), torch.zeros(1, batch, 8))

    def forward(self, x, hidden):
        h, c = hidden[0][0], hidden[1][0]
        outs = []
        for t in range(x.shape[1]):
            gate, cell = self.rnn(torch.cat([x[:, t], h], dim=-1)).chunk(2, dim=-1)
            c = torch.sigmoid(gate) * torch.tanh(cell)  # (bf16 under autocast)
            h = torch.tanh(c)
            outs.append(h)
        return torch.stack(outs, dim=1), (h[None], c[None])


def test_the_wrapper_forwards_attributes_modes_and_state_dict_to_the_users_module():
    stoker = Stoker(device="cpu", precision="bf16", record=False, doctor=False)
    user = _Rnn()
    model = stoker.prepare(user)
    assert model.config == {"hidden": 8} and model.rnn is user.rnn
    model.config = {"hidden": 9}  # the user's module has it: set there
    model.note = "mine"  # the user's module does not: the wrapper's own
    assert user.config == {"hidden": 9} and not hasattr(user, "note") and model.note == "mine"
    user.config = {"hidden": 8}
    out, (h, c) = model(torch.randn(2, 3, 4), model.init_hidden(2))
    assert out.dtype == h.dtype == c.dtype == torch.float32  # bf16 inside, fp32 out
    model.eval()
    assert not user.training and not user.rnn.training
    model.train()
    assert user.training
    assert list(model.state_dict()) == list(user.state_dict())  # the user's keys, no prefix
    fresh = _Rnn()
    fresh.load_state_dict(model.state_dict())
    model.load_state_dict(fresh.state_dict())
    assert all(p is q for p, q in zip(model.parameters(), user.parameters(), strict=True))


def test_unwrap_goes_by_type_through_compile():
    stoker = Stoker(device="cpu", precision="fp32", record=False, doctor=False)
    user = _HasModuleChild()
    compiled = torch.compile(stoker.prepare(user))  # not run: wrapping is enough
    assert Stoker.unwrap(compiled) is user
    assert Stoker.unwrap(torch.compile(user)) is user


def test_compile_runs_the_users_module_under_autocast_and_trains(monkeypatch):
    import functools

    # The eager backend: dynamo traces the wrapper's forward, no C++ build (seconds, not minutes).
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    stoker = Stoker(device="cpu", precision="bf16", compile=True, record=False, doctor=False)
    user = _HasModuleChild()
    model, optimizer = stoker.prepare(user, torch.optim.SGD(user.parameters(), lr=0.1))
    before = user.head.weight.detach().clone()
    for _ in range(2):
        out = model(torch.randn(2, 4))
        assert out.dtype == torch.float32
        stoker.backward(out.square().mean())
        optimizer.step()
        optimizer.zero_grad()
    assert stoker.step == 2 and not torch.equal(before, user.head.weight)
    assert Stoker.unwrap(model) is user and "forward" not in vars(user)


def test_without_ddp_keeps_the_autocast_and_drops_the_collectives(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from stoker.runtime.model import PreparedModel

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        user = _HasModuleChild()
        ddp = DistributedDataParallel(user)
        model = PreparedModel(user, ddp, autocast_dtype=torch.bfloat16, device_type="cpu")
        assert model.ddp is ddp and Stoker.unwrap(model) is user
        local = model.without_ddp()
        assert local.ddp is None and local.unwrapped is user
        assert local.autocast_dtype == torch.bfloat16 and local.forward_module is user
        assert local(torch.randn(2, 4)).dtype == torch.float32
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_hooks_fire_on_the_users_module_and_on_the_wrapper(precision):
    """The wrapper skips nn.Module's hook dispatch for itself until a hook is put on it (a cost
    per step); hooks on the user's module, global ones and hooks put on the wrapper fire."""
    stoker = Stoker(device="cpu", precision=precision, record=False, doctor=False)
    user = nn.Linear(4, 2)
    model = stoker.prepare(user)
    seen: list[str] = []
    user.register_forward_hook(lambda m, i, o: seen.append(f"user {o.dtype}"))
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: seen.append(f"global {type(m).__name__}")
    )
    try:
        out = model(torch.randn(3, 4))
    finally:
        handle.remove()
    inner = "torch.float32" if precision == "fp32" else "torch.bfloat16"
    assert out.dtype == torch.float32  # in bf16, the wrapper's forward ran: fp32 out
    assert seen == ["global Linear", f"user {inner}"]
    seen.clear()
    model.register_forward_pre_hook(lambda m, args: seen.append(f"pre {type(m).__name__}"))
    model.register_forward_hook(lambda m, i, o: seen.append(f"wrapper {o.dtype}"))
    model(torch.randn(3, 4))
    assert seen == ["pre PreparedModel", f"user {inner}", "wrapper torch.float32"]
    stoker.close()


def test_compiling_the_wrapper_or_a_function_calling_it_traces_its_call():
    captured: list[int] = []

    def backend(gm, example_inputs):  # an eager backend that counts the graphs it is given
        captured.append(len(gm.graph.nodes))
        return gm.forward

    stoker = Stoker(device="cpu", precision="fp32", record=False, doctor=False)
    user = nn.Linear(4, 2)
    model = stoker.prepare(user)
    x = torch.randn(3, 4)
    expected = user(x)

    @torch.compile(backend=backend, fullgraph=True)  # fullgraph: no break at the wrapper's call
    def loss(x: torch.Tensor) -> torch.Tensor:
        return model(x).sum()

    assert torch.allclose(loss(x), expected.sum()) and len(captured) == 1
    assert torch.allclose(torch.compile(model, backend=backend)(x), expected)
    assert len(captured) == 2
    model.compile(backend=backend)  # nn.Module.compile: the wrapper's calls go through it
    assert torch.allclose(model(x), expected) and len(captured) == 3
    stoker.close()


def test_a_backward_hook_on_the_wrapper_fires_in_fp32() -> None:
    stoker = Stoker(device="cpu", precision="fp32", record=False, doctor=False)
    model = stoker.prepare(nn.Linear(4, 2))
    seen: list[tuple[int, ...]] = []
    model(torch.randn(3, 4)).sum().backward()  # the direct path first
    model.register_full_backward_hook(lambda m, gin, gout: seen.append(tuple(gout[0].shape)))
    model(torch.randn(3, 4, requires_grad=True)).sum().backward()
    assert seen == [(3, 2)]
    stoker.close()


class _Raises(torch.nn.Module):
    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = message
        self.linear = torch.nn.Linear(2, 2)

    def forward(self, x):
        raise RuntimeError(self.message)


def test_a_layer_without_a_kernel_in_the_autocast_dtype_is_one_clear_error(tmp_path):
    """torch's oneDNN has no bf16 LSTM kernel on AVX2-only CPUs (an AMD EPYC Zen 3): stoker
    says what it means and what to do; any other error is the model's own, untouched."""
    from stoker import StokerError

    stoker = Stoker(device="cpu", precision="bf16", record=False, doctor=False)
    torch_says = (
        "could not create a primitive descriptor for the LSTM forward propagation primitive."
    )
    model = stoker.prepare(_Raises(torch_says))
    with pytest.raises(StokerError, match=r"no bfloat16 kernel .* use precision='fp32'") as caught:
        model(torch.randn(1, 2))
    assert "\n" not in str(caught.value)
    other = stoker.prepare(_Raises("shapes do not match"))
    with pytest.raises(RuntimeError, match=r"^shapes do not match$"):
        other(torch.randn(1, 2))
    # A real nn.LSTM in bf16: it runs where the CPU has the kernel, and is that error where not.
    lstm = stoker.prepare(torch.nn.LSTM(4, 4, batch_first=True))
    try:
        out, _ = lstm(torch.randn(2, 3, 4))
    except StokerError as exc:
        assert "precision='fp32'" in str(exc)
    else:
        assert out.dtype == torch.float32


def test_the_wrapper_calls_the_module_directly_again_once_its_hooks_are_removed():
    """A hook on the wrapper (DDP's same-data check puts one on for the first forward) sends
    calls through nn.Module.__call__ only while it is there."""
    stoker = Stoker(device="cpu", precision="fp32", record=False, doctor=False)
    user = nn.Linear(4, 2)
    model = stoker.prepare(user)
    assert model.__dict__["_call"] is user
    seen: list[int] = []
    handle = model.register_forward_pre_hook(lambda m, args: seen.append(1))
    model(torch.randn(3, 4))
    assert seen == [1] and model.__dict__["_call"] is not user
    handle.remove()
    model(torch.randn(3, 4))  # through nn.Module's path one last time: no hook left
    assert seen == [1] and model.__dict__["_call"] is user
    stoker.close()
