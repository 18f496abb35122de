"""One checkpoint's model weights as a single safetensors file, sharded or not.

    stoker checkpoint export runs/my-run -o model.safetensors        # the newest valid one
    stoker checkpoint export runs/my-run/checkpoints/step-00000500 -o model.safetensors

A sharded (FSDP) checkpoint's shards are consolidated into full tensors
(:func:`stoker.checkpoint.sharded.export_consolidated`); an unsharded one's
``model.safetensors`` is written out with its tied weights under each of their names. The
checkpoint is verified against its manifest first; the output is written to a temporary name
and renamed, so it is complete or absent. What ``safetensors.torch.load_file`` and
``stoker compress`` read.
"""

from __future__ import annotations

import os
from pathlib import Path

from stoker.checkpoint.errors import CheckpointError
from stoker.checkpoint.manifest import verify
from stoker.checkpoint.resume import latest_valid
from stoker.checkpoint.state import SHARDED_DIR, STATE_JSON, read_json, read_tensors

__all__ = ["export_model"]


def _checkpoint(source: Path) -> Path:
    if (source / "manifest.json").is_file():
        verify(source)
        return source
    found = latest_valid(source)
    if found is None:
        raise CheckpointError(
            f"{source} holds no valid checkpoint; pass a run directory, its checkpoints/ "
            "directory or one step-N/ checkpoint"
        )
    return found


def export_model(
    source: str | os.PathLike[str], out_file: str | os.PathLike[str], *, key: str | None = None
) -> tuple[Path, Path]:
    """Write the weights of the model ``key`` (default: the checkpoint's only model, or
    ``"model"``) in ``source`` to ``out_file``; returns ``(checkpoint used, file written)``."""
    checkpoint = _checkpoint(Path(source))
    entries = read_json(checkpoint / STATE_JSON).get("entries")
    if not isinstance(entries, dict):
        raise CheckpointError(f"checkpoint {checkpoint}: {STATE_JSON} has no entries")
    models = {
        k: e
        for k, e in entries.items()
        if isinstance(e, dict)
        and (e.get("kind") == "module" or (e.get("kind") == "sharded" and e.get("role") == "model"))
    }
    if key is None:
        key = "model" if "model" in models or len(models) != 1 else next(iter(models))
    if key not in models:
        raise CheckpointError(
            f"checkpoint {checkpoint} has no model {key!r}; its models are {sorted(models)} "
            "(choose one with --key)"
        )
    entry = models[key]
    if entry["kind"] == "sharded":
        from stoker.checkpoint.sharded import export_consolidated  # imports DCP

        return checkpoint, export_consolidated(checkpoint / SHARDED_DIR, out_file)
    import safetensors.torch

    name = entry.get("file")
    if not isinstance(name, str) or "/" in name:
        raise CheckpointError(f"checkpoint {checkpoint}: {key!r} names no weights file")
    # A tied weight is one tensor under two names here; the file holds each name's own copy.
    tensors = {k: t.clone() for k, t in read_tensors(checkpoint / name).items()}
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    safetensors.torch.save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out)
    return checkpoint, out
