"""The compressed-model file: one ``.safetensors`` file, tensors plus a JSON header entry.

Layout (tensor keys):

- ``<param>``: every parameter of the (pruned) encoder, fp32, or bf16 for the forms that
  compute in bf16 (``bf16``, ``int8-static``, ``int8-weight``); for int8 forms the block
  linears' weights are int8, with ``<param>:scale`` (fp32, one per output channel) beside them;
- ``observer:<buffer>``: int8-static's calibrated activation observers.

The header entry ``stoker.compressed`` holds the encoder config and the prune / quant configs
as JSON, and ``sha256``: a digest of every tensor's name, dtype, shape and bytes, so flipped
bytes anywhere in the data are caught on load (safetensors itself checks only the layout).
Reading uses safetensors and ``json`` only: a file is data and never runs code. Everything read
is checked before it is used: the header's types, the tensors' shapes against the shapes the
stored config implies (worked out on the meta device, so a crafted ``vocab_size`` of 10^12
allocates nothing), and each int8 weight's scales.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import Tensor

from stoker.compress.config import PruneConfig, QuantConfig
from stoker.errors import StokerError
from stoker.models import Encoder, EncoderConfig

__all__ = ["FORMAT", "Artifact", "read_artifact", "write_artifact"]

FORMAT = 2  # 2: the sha256 digest
_HEADER = "stoker.compressed"
_SCALE = ":scale"
_OBSERVER = "observer:"


class Artifact:
    """What a compressed-model file holds, decoded: configs, fp32 weights, observers."""

    def __init__(
        self,
        config: EncoderConfig,
        prune: PruneConfig,
        quant: QuantConfig,
        weights: dict[str, Tensor],
        observers: dict[str, Tensor],
        info: dict[str, Any],
        stored_bytes: dict[str, int],
    ) -> None:
        self.config = config
        self.prune = prune
        self.quant = quant
        self.weights = weights
        """Floating-point state dict of the encoder (int8 weights already times their scale)."""
        self.observers = observers
        self.info = info
        """Free-form provenance: source checkpoint, sparsity reached, fine-tune losses."""
        self.stored_bytes = stored_bytes
        """Bytes each parameter takes in the file (an int8 weight's scales included)."""


def write_artifact(
    path: str | Path,
    config: EncoderConfig,
    prune: PruneConfig,
    quant: QuantConfig,
    state: dict[str, Tensor],
    *,
    int8: dict[str, tuple[Tensor, Tensor]],
    observers: dict[str, Tensor],
    info: dict[str, Any],
) -> Path:
    """Write the file atomically (temporary name, then rename); returns its path."""
    path = Path(path)
    tensors: dict[str, Tensor] = {}
    for name, value in state.items():
        if name in int8:
            q, scale = int8[name]
            tensors[name], tensors[name + _SCALE] = q.contiguous(), scale.contiguous()
        elif quant.computes_in_bf16 and value.is_floating_point():
            tensors[name] = value.detach().to(torch.bfloat16).contiguous()
        else:
            tensors[name] = value.detach().float().contiguous()
    for name, value in observers.items():
        tensors[_OBSERVER + name] = value.detach().contiguous()
    tensors = {k: v.cpu() for k, v in tensors.items()}
    header = {
        "format": FORMAT,
        "encoder": asdict(config),
        "prune": asdict(prune),
        "quant": asdict(quant),
        "info": info,
        "sha256": _digest(tensors),
    }
    if path.is_dir():
        raise StokerError(
            f"{path} is a directory; give a file path such as {path / 'model.safetensors'}"
        )
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, tmp, metadata={_HEADER: json.dumps(header)})
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StokerError(
            f"cannot write {path}: {exc.strerror or exc}; choose a writable --out path"
        ) from None
    return path


def _digest(tensors: dict[str, Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # type: ignore[arg-type]
    return h.hexdigest()


def read_artifact(path: str | Path) -> Artifact:
    """Decode a compressed-model file; a file that is not one raises a one-line StokerError."""
    path = Path(path)
    if not path.is_file():
        raise StokerError(f"{path}: no such compressed-model file; make one with stoker compress.")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(_HEADER)
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise StokerError(f"{path}: not a readable safetensors file ({exc}).") from None
    if raw is None:
        raise StokerError(
            f"{path}: a safetensors file without a stoker.compressed header; "
            "give the .safetensors file written by stoker compress."
        )
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise TypeError(f"the header is a JSON {type(header).__name__}, not an object")
        if header.get("format") != FORMAT:
            raise StokerError(
                f"{path}: compressed-model format {header.get('format')!r}, this stoker reads "
                f"{FORMAT}; compress the checkpoint again with this version."
            )
        config = EncoderConfig(**header["encoder"])
        prune = PruneConfig(**header["prune"])
        quant = QuantConfig(**header["quant"])
        info = header.get("info", {})
        if not isinstance(info, dict):
            raise TypeError("info is not an object")
    except (KeyError, TypeError, json.JSONDecodeError, StokerError) as exc:
        raise StokerError(f"{path}: damaged stoker.compressed header ({exc}).") from None
    if header.get("sha256") != _digest(tensors):
        raise StokerError(
            f"{path}: the tensors don't match the file's SHA-256 digest: the file is damaged "
            "(truncated or changed on disk); compress the checkpoint again."
        )
    expected = _expected_shapes(config)
    weights: dict[str, Tensor] = {}
    observers: dict[str, Tensor] = {}
    for name, value in tensors.items():
        if name.startswith(_OBSERVER):
            observers[name.removeprefix(_OBSERVER)] = value
        elif name.endswith(_SCALE):
            continue
        elif value.dtype == torch.int8:
            scale = tensors.get(name + _SCALE)
            if scale is None:
                raise StokerError(
                    f"{path}: int8 tensor {name!r} has no scale; the file is damaged."
                )
            if scale.dtype != torch.float32 or tuple(scale.shape) != (value.shape[0],):
                raise StokerError(
                    f"{path}: int8 tensor {name!r} {tuple(value.shape)} has scales of shape "
                    f"{tuple(scale.shape)} ({scale.dtype}), not one fp32 scale per row; "
                    "the file is damaged."
                )
            weights[name] = value.float() * scale[:, None]
        else:
            weights[name] = value.float()
        want = expected.get(name)
        if want is not None and tuple(weights[name].shape) != want:
            raise StokerError(
                f"{path}: {name!r} has shape {tuple(weights[name].shape)} but the stored config "
                f"implies {want}; the file is damaged."
            )
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise StokerError(f"{path}: no tensor for {missing[0]!r} ({len(missing)} missing).")
    stored = {name: tensors[name].nbytes for name in weights}
    for name in stored:
        if name + _SCALE in tensors:
            stored[name] += tensors[name + _SCALE].nbytes
    return Artifact(config, prune, quant, weights, observers, info, stored)


def _expected_shapes(config: EncoderConfig) -> dict[str, tuple[int, ...]]:
    """Parameter and buffer shapes of an encoder of ``config``, allocating nothing."""
    with torch.device("meta"):
        model = Encoder(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}
