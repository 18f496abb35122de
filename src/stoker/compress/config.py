"""What to do to a trained model: :class:`PruneConfig` and :class:`QuantConfig`."""

from __future__ import annotations

from dataclasses import dataclass

from stoker.errors import StokerError

__all__ = ["PRUNE_METHODS", "QUANT_METHODS", "PruneConfig", "QuantConfig"]

PRUNE_METHODS = ("none", "magnitude", "structured", "2:4")
QUANT_METHODS = ("none", "int8-dynamic", "int8-static", "int8-weight", "bf16")


@dataclass(frozen=True, kw_only=True, slots=True)
class PruneConfig:
    """How to prune, and whether to fine-tune afterwards.

    Methods:
        ``magnitude``: zero the ``sparsity`` fraction of smallest-magnitude weights, counted
            globally over every linear layer of the transformer blocks (unstructured; the
            tensors keep their shape, so it saves neither bytes nor time on a dense kernel).
        ``structured``: physically remove the ``sparsity`` fraction of FFN neurons and the
            ``head_sparsity`` fraction of attention heads in every block (least important by
            weight norm first); the model becomes a smaller dense model.
        ``2:4``: in every group of 4 consecutive input weights keep the 2 largest (50%).
    """

    method: str = "none"
    sparsity: float = 0.5
    """magnitude: fraction of weights zeroed; structured: fraction of FFN neurons removed."""
    head_sparsity: float = 0.0
    """structured only: fraction of attention heads removed per block."""
    finetune_steps: int = 0
    """Optimizer steps of MLM fine-tuning after pruning (pruned weights stay zero)."""
    finetune_lr: float = 5e-4

    def __post_init__(self) -> None:
        if self.method not in PRUNE_METHODS:
            raise StokerError(
                f"Unknown prune method {self.method!r}; choose one of {', '.join(PRUNE_METHODS)}."
            )
        for name in ("sparsity", "head_sparsity"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise StokerError(f"PruneConfig.{name}={value} must be in [0, 1).")
        if self.finetune_steps < 0:
            raise StokerError(f"PruneConfig.finetune_steps={self.finetune_steps} must be >= 0.")
        if self.finetune_lr <= 0:
            raise StokerError(f"PruneConfig.finetune_lr={self.finetune_lr} must be positive.")

    @property
    def label(self) -> str:
        """Short name for tables: ``magnitude-50%``, ``structured-50%+h25%``, ``2:4``."""
        if self.method in ("none", "2:4"):
            return self.method
        label = f"{self.method}-{self.sparsity:.0%}"
        if self.method == "structured" and self.head_sparsity:
            label += f"+h{self.head_sparsity:.0%}"
        return label


@dataclass(frozen=True, kw_only=True, slots=True)
class QuantConfig:
    """How to quantize the linear layers of the transformer blocks.

    Methods:
        ``int8-dynamic``: int8 weights, activations quantized per batch at run time (torchao).
        ``int8-static``: int8 weights and activations, activation ranges calibrated on
            ``calibration_batches`` training batches (PT2E with the x86 inductor quantizer,
            which lowers to oneDNN int8 kernels; AMX where the CPU has it).
        ``int8-weight``: int8 weights only, computed in floating point (torchao).
        ``bf16``: every floating-point weight in bfloat16: the baseline int8 has to beat
            (computed in bf16 where that is fast, else in fp32 from the bf16 values).
    """

    method: str = "none"
    calibration_batches: int = 8

    def __post_init__(self) -> None:
        if self.method not in QUANT_METHODS:
            raise StokerError(
                f"Unknown quantize method {self.method!r}; "
                f"choose one of {', '.join(QUANT_METHODS)}."
            )
        if self.calibration_batches < 1:
            raise StokerError(
                f"QuantConfig.calibration_batches={self.calibration_batches} must be >= 1."
            )

    @property
    def is_int8(self) -> bool:
        return self.method.startswith("int8")

    @property
    def computes_in_bf16(self) -> bool:
        """Runs under bf16 autocast where bf16 is fast: the weights that are not int8 are
        stored in bf16 too, since there every product they enter is computed in bf16 anyway
        (a machine without fast bf16 computes them in fp32, from the same bf16 values)."""
        return self.method in ("bf16", "int8-static", "int8-weight")
