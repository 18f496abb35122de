"""The model :meth:`Stoker.prepare` hands back: a wrapper around the user's module, never a patch.

:class:`PreparedModel` holds two modules: the user's own, untouched (its ``forward`` is its own,
so ``torch.export`` or a plain ``state_dict`` of it sees no autocast), and the module it calls
forward through: the user's module, or ``DistributedDataParallel`` around it, either one under
``torch.compile`` when asked. Its ``forward`` runs that module under the precision policy's
autocast and hands half-precision outputs back in fp32, each container as its own type (see
:mod:`stoker.runtime.nested`). What it is not:

- not a new set of weights: ``state_dict()`` and ``load_state_dict()`` are the user module's,
  with the user module's keys (no ``module.`` prefix), so checkpoints load into a bare model;
- not a wall: attributes it does not have come from the user's module (``model.init_hidden``,
  ``model.config``) and are set there when the user's module has them; so does indexing
  (``model[0]`` of a ``Sequential``); ``train()`` and ``eval()`` reach the user's module as a
  child. Methods called that way run the user's module directly: without autocast, and outside DDP.

:func:`unwrap_model` takes wrappers off by type — this one, DDP, ``torch.compile``'s
``OptimizedModule`` — never by following an attribute named ``module``: a user's model may have
a child called that.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.hooks import RemovableHandle

from stoker.errors import StokerError
from stoker.runtime.nested import map_tensors

__all__ = ["PreparedModel", "is_sharded", "unwrap_model"]

_HALF = (torch.bfloat16, torch.float16)

# torch's message when oneDNN has no kernel for a layer in the autocast dtype on this CPU
# (nn.LSTM in bf16 without AVX-512, e.g. an AMD EPYC Zen 3).
_NO_ONEDNN_KERNEL = "could not create a primitive descriptor"


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in _HALF else t


def _to_fp32(output: Any) -> Any:
    """Cast half-precision floating tensors in a (nested) model output back to fp32, keeping
    every container's type (an HF ``ModelOutput`` stays one: ``outputs.loss`` works)."""
    if isinstance(output, torch.Tensor):
        return _fp32(output)
    return map_tensors(_fp32, output)


def _compiled_type() -> type[nn.Module] | None:
    # Only a process that imported dynamo can hold a compiled module; importing it costs ~1 s.
    if "torch._dynamo" not in sys.modules:
        return None
    from torch._dynamo.eval_frame import OptimizedModule

    return OptimizedModule


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` has DTensor parameters (sharded by FSDP2)."""
    tensor = sys.modules.get("torch.distributed.tensor")
    if tensor is None:  # nothing imported DTensor in this process: no parameter is one
        return False
    return any(isinstance(p, tensor.DTensor) for p in module.parameters())


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's own module inside a :class:`PreparedModel`, ``DistributedDataParallel`` and
    ``torch.compile`` wrappers, taken off by type; any other module is returned as it is."""
    compiled = _compiled_type()
    while True:
        if isinstance(model, PreparedModel):
            model = model.unwrapped
        elif isinstance(model, DistributedDataParallel):
            model = model.module
        elif compiled is not None and isinstance(model, compiled):
            model = model._orig_mod  # type: ignore[assignment]  # the compiled original
        else:
            return model


class PreparedModel(nn.Module):
    """The user's module run on the device, under autocast, through DDP and compile if asked.

    Args:
        module: the user's module (on the device already).
        forward_module: what ``forward`` calls: ``module`` itself, or a DDP and/or
            ``torch.compile`` wrapper around it.
        autocast_dtype: the precision policy's autocast dtype, None for fp32.
        device_type: the device type autocast runs on (``"cpu"``, ``"cuda"``).
    """

    def __init__(
        self,
        module: nn.Module,
        forward_module: nn.Module,
        *,
        autocast_dtype: torch.dtype | None,
        device_type: str,
    ) -> None:
        super().__init__()
        self.forward_module = forward_module  # a child: train()/eval()/to() reach the user's
        self.__dict__["_forward"] = forward_module  # the same, without nn.Module's lookup
        # The user's module is inside forward_module; kept outside nn.Module's registries so it
        # is not a second child (named_parameters would list every weight twice over).
        self.__dict__["unwrapped"] = module
        self.__dict__["ddp"] = (
            forward_module if isinstance(forward_module, DistributedDataParallel) else None
        )
        if self.ddp is None:  # compile(DDP(module)): reach the DDP under compile's wrapper
            inner = getattr(forward_module, "_orig_mod", None)
            if isinstance(inner, DistributedDataParallel):
                self.__dict__["ddp"] = inner
        self.__dict__["autocast_dtype"] = autocast_dtype
        self.__dict__["device_type"] = device_type
        self.__dict__["_call"] = self._direct_call()  # what a call runs (see __call__)

    # Typed views of what __init__ put in __dict__ (found there before __getattr__ is asked).
    unwrapped: nn.Module
    """The user's own module."""
    ddp: DistributedDataParallel | None
    """The ``DistributedDataParallel`` wrapper forward runs through, if any."""
    autocast_dtype: torch.dtype | None
    device_type: str
    _forward: nn.Module
    _call: Callable[..., Any]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # One dict read, then the call. Checking the wrapper's five hook dicts here (each read
        # through nn.Module's __getattr__) made this call ~5,500 machine instructions a step,
        # half of stoker's per-step cost on a small model; this is ~1,600-2,100 (callgrind,
        # benchmarks/step_instructions.py). The user's module inside runs through its own
        # __call__, so its hooks and the global ones fire; a hook put on the wrapper, or
        # compiling it, switches the wrapper to nn.Module's path until it has neither.
        return self.__dict__["_call"](*args, **kwargs)

    def _direct_call(self) -> Callable[..., Any]:
        """The module itself in fp32, else ``forward`` (autocast, fp32 outputs)."""
        return self._forward if self.autocast_dtype is None else self.forward

    def _call_through_module(self) -> None:
        self.__dict__["_call"] = self._module_call

    def _module_call(self, *args: Any, **kwargs: Any) -> Any:
        """nn.Module.__call__'s path (the wrapper's hooks, its compiled call); once the last
        hook is removed (the same-data check's, after the first forward), the direct call."""
        if not (
            self._forward_hooks
            or self._forward_pre_hooks
            or self._backward_hooks
            or self._backward_pre_hooks
            or self._compiled_call_impl is not None
        ):
            self.__dict__["_call"] = self._direct_call()
        return super().__call__(*args, **kwargs)

    def register_forward_pre_hook(self, *args: Any, **kwargs: Any) -> RemovableHandle:
        self._call_through_module()
        return super().register_forward_pre_hook(*args, **kwargs)

    def register_forward_hook(self, *args: Any, **kwargs: Any) -> RemovableHandle:
        self._call_through_module()
        return super().register_forward_hook(*args, **kwargs)

    def register_full_backward_pre_hook(self, *args: Any, **kwargs: Any) -> RemovableHandle:
        self._call_through_module()
        return super().register_full_backward_pre_hook(*args, **kwargs)

    def register_full_backward_hook(self, *args: Any, **kwargs: Any) -> RemovableHandle:
        self._call_through_module()
        return super().register_full_backward_hook(*args, **kwargs)

    def register_backward_hook(self, *args: Any, **kwargs: Any) -> RemovableHandle:
        self._call_through_module()
        return super().register_backward_hook(*args, **kwargs)

    def compile(self, *args: Any, **kwargs: Any) -> None:
        super().compile(*args, **kwargs)
        self._call_through_module()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        dtype = self.autocast_dtype
        if dtype is None:
            return self._forward(*args, **kwargs)
        with torch.autocast(device_type=self.device_type, dtype=dtype):
            try:
                output = self._forward(*args, **kwargs)
            except RuntimeError as exc:
                if self.device_type == "cpu" and _NO_ONEDNN_KERNEL in str(exc):
                    raise StokerError(
                        f"this CPU has no {str(dtype).removeprefix('torch.')} kernel for a layer "
                        f"of the model (torch's oneDNN: {str(exc).split('.')[0]}; nn.LSTM in bf16 "
                        "needs AVX-512); use precision='fp32' for this model on this CPU"
                    ) from exc
                raise
        # Losses computed outside the model (cross-entropy on bf16 logits) lose precision;
        # hand fp32 back like a fp32 model would.
        return _to_fp32(output)

    def without_ddp(self) -> PreparedModel:
        """This model with DDP taken out (the user's module, eagerly, under the same autocast):
        what the doctor's probes re-run on the main rank alone, where DDP's collectives would
        wait for ranks that never join. Itself when there is no DDP."""
        if self.ddp is None:
            return self
        return PreparedModel(
            self.unwrapped,
            self.unwrapped,
            autocast_dtype=self.autocast_dtype,
            device_type=self.device_type,
        )

    # -- the user's module's state, under its own keys ------------------------------------
    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        return self.unwrapped.state_dict(*args, **kwargs)

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        return self.unwrapped.load_state_dict(state_dict, strict=strict, assign=assign)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # parameters, buffers, children of the wrapper
        except AttributeError:
            unwrapped = self.__dict__.get("unwrapped")
            if unwrapped is None:
                raise
            return getattr(unwrapped, name)

    def __setattr__(self, name: str, value: Any) -> None:
        # An attribute the user's module has (and the wrapper does not) is set there, so that
        # `model.dropout_p = 0.0` on the prepared model reaches the module that reads it.
        unwrapped = self.__dict__.get("unwrapped")
        if (
            unwrapped is not None
            and name not in self.__dict__
            and not hasattr(type(self), name)
            and hasattr(unwrapped, name)
        ):
            setattr(unwrapped, name, value)
            return
        super().__setattr__(name, value)

    def __getitem__(self, index: Any) -> Any:  # model[1] on a Sequential, ModuleList, ...
        return self.unwrapped[index]  # type: ignore[index]

    def __repr__(self) -> str:
        return f"PreparedModel({self.unwrapped!r})"
