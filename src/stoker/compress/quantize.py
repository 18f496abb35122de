"""Quantization of an :class:`~stoker.models.Encoder`'s block linears, and the runnable result.

Every form is built by one function, :func:`build_runnable`, from the fp32 weights and (for
int8-static) the calibrated activation observers, both of which the saved file holds: loading a
compressed model replays exactly the steps that made it, so the loaded model computes what the
compressed one did, and the file needs no pickled objects.

The int8 paths are the ones that run fast on x86 CPUs: PT2E (``torch.export`` then
``prepare_pt2e`` / ``convert_pt2e``) with the x86 inductor quantizer, compiled with inductor's
freezing so that the linears lower to oneDNN int8 kernels (AMX on CPUs that have it). Only the
blocks' ``nn.Linear`` layers are annotated: the tied embedding / output projection stays in
floating point. What is not int8 runs in the float precision this machine is fast at, decided when
the model is built (:func:`stoker.runtime.bf16_is_fast`): bf16 autocast ("int8-mixed-bf16") where
bf16 products are fast (AMX, AVX512-BF16), fp32 where bf16 is emulated (AVX2-only CPUs, 40-70x
slower). The ``bf16`` form likewise computes in fp32 there, from its bf16-rounded weights.
Dynamic and weight-only int8 use torchao's ``Int8DynamicActivationInt8WeightConfig`` /
``Int8WeightOnlyConfig`` (PT2E's dynamic x86 recipe gave wrong logits on this encoder with
torch 2.13 / torchao 0.18: 5% accuracy).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator

import torch
import torch._inductor.config as _inductor_config
from torch import Tensor, nn

from stoker.compress.config import QuantConfig
from stoker.compress.prune import prunable_linears
from stoker.errors import StokerError
from stoker.models import Encoder
from stoker.runtime.hardware import bf16_is_fast

__all__ = ["OBSERVER_PREFIX", "Runnable", "build_runnable", "serving_inputs", "snap_to_int8_"]

OBSERVER_PREFIX = "activation_post_process_"
Runnable = Callable[..., Tensor]


@contextlib.contextmanager
def _quiet_torchao() -> Iterator[None]:
    """Import torchao without its warnings about CUDA-only kernels missing from a CPU install
    (and torch's about torchao registering an enum): noise, not news, for a CPU user."""
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)


@torch.no_grad()
def snap_to_int8_(model: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    """Round every prunable linear weight to a symmetric per-output-channel int8 grid, in place.

    Returns ``{weight name: (int8 values, fp32 scales)}``: what the file stores. The quantizer
    then quantizes weights that already lie on an int8 grid, so the file's 8-bit values plus
    scales carry all the information the compressed model has.
    """
    stored = {}
    for name, layer in prunable_linears(model).items():
        w = layer.weight
        scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-12).float()
        q = torch.round(w.float() / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        w.copy_(q.float() * scale[:, None])
        stored[f"{name}.weight"] = (q, scale)
    return stored


def serving_inputs(
    input_ids: Tensor,
    *,
    document_ids: Tensor | None = None,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
    predict_positions: Tensor | None = None,
) -> dict[str, Tensor]:
    """The four tensors every compiled / exported form takes, with the defaults filled in.

    A padding mask becomes document ids (real tokens one document, padding another), which
    gives real tokens the same attention; no positions means every position is predicted.
    """
    b, t = input_ids.shape
    if document_ids is None:
        document_ids = (
            torch.zeros_like(input_ids)
            if attention_mask is None
            else torch.where(attention_mask.bool(), 0, -1).to(input_ids.dtype)
        )
    if position_ids is None:
        position_ids = torch.arange(t, device=input_ids.device).expand(b, t)
    if predict_positions is None:
        predict_positions = torch.arange(t, device=input_ids.device).expand(b, t)
    return {
        "input_ids": input_ids,
        "document_ids": document_ids,
        "position_ids": position_ids,
        "predict_positions": predict_positions,
    }


def _example_inputs(model: Encoder) -> dict[str, Tensor]:
    t = min(16, model.config.max_len)
    ids = torch.randint(0, model.config.vocab_size, (2, t))
    return serving_inputs(ids, predict_positions=torch.zeros(2, 4, dtype=torch.long))


def _export(model: Encoder) -> nn.Module:
    from torch.export import Dim

    cfg = model.config
    batch = Dim("batch", min=1, max=4096)
    seq = Dim("seq", min=2, max=cfg.max_len)
    slots = Dim("slots", min=1, max=cfg.max_len)
    shapes = {
        "input_ids": {0: batch, 1: seq},
        "document_ids": {0: batch, 1: seq},
        "position_ids": {0: batch, 1: seq},
        "predict_positions": {0: batch, 1: slots},
    }
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = torch.export.export(model, (), _example_inputs(model), dynamic_shapes=shapes)
    return exported.module()


def _pt2e(
    model: Encoder,
    *,
    calibration: Iterable[dict[str, Tensor]] | None,
    observers: dict[str, Tensor] | None,
) -> tuple[nn.Module, dict[str, Tensor]]:
    with _quiet_torchao():
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

    quantizer = x86.X86InductorQuantizer()
    quantizer.set_module_type_qconfig(nn.Linear, x86.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(_export(model), quantizer)
    if observers is not None:
        _load_observers(prepared, observers)
    else:
        if calibration is None:
            raise StokerError(
                "int8-static needs calibration batches (training data) to measure "
                "activation ranges; pass train batches to compress()."
            )
        with torch.no_grad():
            for batch in calibration:
                prepared(**serving_inputs(**batch))
    observers = {
        name: buf.detach().clone()
        for name, buf in prepared.named_buffers()
        if name.startswith(OBSERVER_PREFIX)
    }
    return convert_pt2e(prepared), observers


def _load_observers(prepared: nn.Module, observers: dict[str, Tensor]) -> None:
    """Put saved observer buffers back. Direct assignment: the observers' own state-dict
    loading skips some buffers (``eps``) and min/max start with a different shape."""
    for name, value in observers.items():
        owner_name, _, buffer = name.rpartition(".")
        try:
            owner = prepared.get_submodule(owner_name)
        except AttributeError:
            owner = None
        if owner is None or buffer not in owner._buffers:
            raise StokerError(
                f"the saved int8-static observer {name!r} does not exist in the rebuilt model; "
                "the file was made by a different stoker or torchao version: compress again."
            )
        owner._buffers[buffer] = value.clone()


def build_runnable(
    model: Encoder,
    quant: QuantConfig,
    *,
    calibration: Iterable[dict[str, Tensor]] | None = None,
    observers: dict[str, Tensor] | None = None,
    compile: bool = False,
) -> tuple[Runnable, dict[str, Tensor]]:
    """A callable taking :func:`serving_inputs` and returning fp32 logits, plus the calibrated
    observers (int8-static) to save. ``model`` (fp32, eval) is consumed."""
    model = model.eval()
    bf16_fast = bf16_is_fast("cpu")
    autocast = False
    module: nn.Module = model
    saved: dict[str, Tensor] = {}
    if quant.method == "bf16" and bf16_fast:
        module = model.to(torch.bfloat16)
    elif quant.method in ("int8-weight", "int8-dynamic"):
        with _quiet_torchao():
            from torchao.quantization import (
                Int8DynamicActivationInt8WeightConfig,
                Int8WeightOnlyConfig,
                quantize_,
            )

        linears = set(prunable_linears(model).values())
        recipe = (
            Int8WeightOnlyConfig()
            if quant.method == "int8-weight"
            else Int8DynamicActivationInt8WeightConfig()
        )
        quantize_(model, recipe, filter_fn=lambda m, _: m in linears)
        autocast = quant.method == "int8-weight" and bf16_fast
    elif quant.method == "int8-static":
        module, saved = _pt2e(model, calibration=calibration, observers=observers)
        autocast = bf16_fast
    if compile:
        # inductor's int8 lowering warns about its own tensor copies on every compile; the
        # warning is about torch's code, not the caller's, so it is filtered (narrowly).
        warnings.filterwarnings(
            "ignore",
            message="To copy construct from a tensor",
            category=UserWarning,
            module=r"torch\._inductor\.mkldnn_lowerings",
        )
        # Every eager form compiles the same code object (Encoder.forward), and each loaded
        # model and input shape adds an entry for it: past dynamo's default limit of 8 a
        # model would silently run uncompiled. One entry per (model, shape) is expected here.
        import torch._dynamo.config as dynamo_config

        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
        compiled: Callable[..., Tensor] = torch.compile(module)
    else:
        compiled = module

    def run(**inputs: Tensor) -> Tensor:
        guard = (
            torch.autocast("cpu", dtype=torch.bfloat16)
            if autocast and inputs["input_ids"].device.type == "cpu"
            else contextlib.nullcontext()
        )
        # freezing folds the (quantized) weights into constants: what lets inductor prepack
        # them for oneDNN, the step that turns int8 PT2E graphs into int8 kernels. It is set
        # around each call because a new input shape compiles again inside the call.
        frozen = _inductor_config.patch(freezing=True) if compile else contextlib.nullcontext()
        with torch.no_grad(), guard, frozen:
            return compiled(**inputs).float()

    return run, saved
