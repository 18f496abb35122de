"""Serving: :func:`load_compressed` turns a compressed-model file into a callable model.

    >>> model = load_compressed("runs/.../compressed/int8-static.safetensors")  # doctest: +SKIP
    >>> logits = model(input_ids, predict_positions=masked)  # [B, M, vocab], fp32
    >>> tokens = model.predict(input_ids, predict_positions=masked)  # [B, M] token ids

The latency numbers of ``stoker compress`` and of the experiment are measured through exactly
this object.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from stoker.compress.artifact import read_artifact
from stoker.compress.prune import prunable_linears
from stoker.compress.quantize import build_runnable, serving_inputs
from stoker.errors import StokerError
from stoker.models import Encoder

__all__ = ["CompressedModel", "load_compressed"]


class CompressedModel:
    """A compressed encoder ready for predictions (CPU, inference only, no gradients)."""

    def __init__(self, path: Path, *, compile: bool) -> None:
        art = read_artifact(path)
        self.path = path
        self.config, self.prune, self.quant, self.info = art.config, art.prune, art.quant, art.info
        model = Encoder(art.config)
        try:
            model.load_state_dict(art.weights, strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[-1].strip()
            raise StokerError(f"{path}: weights don't fit the stored config ({first}).") from None
        self.params = sum(p.numel() for p in model.parameters())
        self.nonzero_params = sum(int(torch.count_nonzero(p)) for p in model.parameters())
        linears = prunable_linears(model)
        self.file_bytes = path.stat().st_size
        self.linear_weight_bytes = sum(art.stored_bytes[f"{n}.weight"] for n in linears)
        """Bytes the file spends on the block linears' weights (int8: values and scales)."""
        self.compiled = compile
        self._run, _ = build_runnable(
            model, art.quant, observers=art.observers or None, compile=compile
        )

    def __call__(
        self,
        input_ids: Tensor,
        *,
        document_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        predict_positions: Tensor | None = None,
    ) -> Tensor:
        """fp32 logits, [B, M, vocab] at ``predict_positions`` or [B, T, vocab]."""
        return self._run(
            **serving_inputs(
                input_ids,
                document_ids=document_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                predict_positions=predict_positions,
            )
        )

    def predict(self, input_ids: Tensor, **inputs: Tensor) -> Tensor:
        """The most likely token id at each predicted position."""
        return self(input_ids, **inputs).argmax(dim=-1)

    @property
    def name(self) -> str:
        """``<prune label> + <quant method>``, e.g. ``structured-50% + int8-static``."""
        return f"{self.prune.label} + {self.quant.method}"


def load_compressed(path: str | Path, *, compile: bool = True) -> CompressedModel:
    """Load a file written by ``stoker compress`` / :meth:`Compressed.save`, ready to call.

    ``compile=True`` compiles with inductor (freezing on): the int8 forms only run as int8
    kernels compiled, and each new input shape compiles once (seconds) on its first call.
    Loading reads tensors and JSON only; nothing in the file is executed.
    """
    return CompressedModel(Path(path), compile=compile)
