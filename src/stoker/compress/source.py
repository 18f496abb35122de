"""Where a model to compress comes from: a run directory or one of its checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from stoker.checkpoint import CheckpointError, latest_valid, verify
from stoker.errors import StokerError
from stoker.models import PRESETS, Encoder, EncoderConfig
from stoker.records.record import read_record

__all__ = ["TrainedModel", "load_trained"]


class TrainedModel:
    """An encoder restored from a checkpoint, with where it came from."""

    def __init__(self, model: Encoder, checkpoint: Path, run_dir: Path | None) -> None:
        self.model = model
        self.checkpoint = checkpoint
        self.run_dir = run_dir
        """The run the checkpoint belongs to (``<run>/checkpoints/step-N``), if it does."""


def _run_config(run_dir: Path | None) -> dict[str, Any]:
    if run_dir is None or not (run_dir / "record.json").is_file():
        return {}
    record = read_record(run_dir)  # a bounded regular file holding a JSON object, or one line
    config = record.get("config")
    return config if isinstance(config, dict) else {}


def load_trained(path: str | Path) -> TrainedModel:
    """The :class:`Encoder` saved in a run directory (its newest valid checkpoint) or in a
    checkpoint directory, its checksums verified; shapes come from the weights, the head count
    from the run's recorded ``--preset`` (tiny when no record says otherwise)."""
    path = Path(path)
    if not path.exists():
        raise StokerError(f"{path}: no such run or checkpoint directory.")
    if (path / "manifest.json").is_file():
        checkpoint = path
        try:
            verify(checkpoint)
        except CheckpointError as exc:
            raise StokerError(f"{checkpoint}: checkpoint failed verification ({exc}).") from None
    else:
        found = latest_valid(path)
        if found is None:
            raise StokerError(
                f"{path}: no valid checkpoint in this run (train with checkpointing on, e.g. "
                "python examples/train_mlm.py, which saves one at the end)."
            )
        checkpoint = found
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None
    weights_file = checkpoint / "model.safetensors"
    if not weights_file.is_file():
        raise StokerError(f"{checkpoint}: has no model.safetensors (no module saved as 'model').")
    state = load_file(str(weights_file))
    try:
        vocab, dim = state["tok_emb.weight"].shape
        layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        ffn_dim = state["blocks.0.mlp_in.weight"].shape[0]
        attn_dim = state["blocks.0.attn_out.weight"].shape[1]
        max_len = state["pos_emb.weight"].shape[0]
    except (KeyError, ValueError):
        raise StokerError(
            f"{weights_file}: not the weights of a stoker.models.Encoder; stoker compress "
            "works on the built-in MLM model."
        ) from None
    preset = str(_run_config(run_dir).get("preset", "tiny"))
    heads = int(PRESETS.get(preset, PRESETS["tiny"])["heads"])
    config = EncoderConfig(
        vocab_size=vocab,
        max_len=max_len,
        dim=dim,
        layers=layers,
        heads=heads,
        head_dim=attn_dim // heads,
        ffn_dim=ffn_dim,
    )
    model = Encoder(config)
    model.load_state_dict(state)
    return TrainedModel(model.eval(), checkpoint, run_dir)
