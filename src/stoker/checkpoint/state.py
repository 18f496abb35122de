"""From a state dict of live objects to checkpoint files, and back into the live objects.

The user's ``state`` maps names to modules, stateful objects (anything with ``state_dict()`` and
``load_state_dict()``: optimizers, schedulers, gradient scalers, samplers) or plain data
(step counters, config dicts, tensors). A checkpoint directory holds::

    model.safetensors     one per nn.Module value: its state_dict, loadable by any safetensors
                          reader (tied weights stored once, the aliases in the header metadata)
    state.json            everything else, as JSON (see _tree.py) ...
    state.safetensors     ... whose tensors live here (optimizer moments, ...)
    rank-00000.json       per process: RNG states and the optional per-rank state
    rank-00000.safetensors
    sharded/              with ``sharded=KEY``: that model and every optimizer of the state,
                          written by every process through DCP (see sharded.py), instead of
                          KEY.safetensors and the optimizers' entries in state.json
    manifest.json         sizes and SHA-256 of all of the above, written last

Nothing here touches pickle: the only readers are ``json`` and ``safetensors``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stoker import safe_files
from stoker.checkpoint import _tree
from stoker.checkpoint.errors import CheckpointError
from stoker.checkpoint.rng import capture_rng

__all__ = [
    "SHARDED_DIR",
    "PendingFile",
    "ShardedPart",
    "Snapshot",
    "is_sharded",
    "is_stateful",
    "read_json",
    "read_tensors",
    "snapshot",
    "unwrap_module",
]

STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"
SHARDED_DIR = "sharded"
JSON_LIMIT = 256 << 20  # bytes; JSON holds structure (tensors live in safetensors), a few MB
_ALIASES = "stoker.aliases"
_COPY_CHUNK = 16 << 20  # bytes per copy job of an async snapshot
_TAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,100}")
_RESERVED = ("state", "manifest")


def rank_stem(rank: int) -> str:
    return f"rank-{rank:05d}"


def is_stateful(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(
        getattr(obj, "load_state_dict", None)
    )


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` has DTensor parameters (FSDP2 shards); see
    :func:`stoker.runtime.model.is_sharded`."""
    from stoker.runtime.model import is_sharded

    return is_sharded(module)


def unwrap_module(module: nn.Module) -> nn.Module:
    """The user's module inside stoker's prepared model, DDP and ``torch.compile`` wrappers
    (taken off by type, see :func:`stoker.runtime.model.unwrap_model`), so checkpoints are
    portable."""
    from stoker.runtime.model import unwrap_model

    return unwrap_model(module)


@dataclass(slots=True)
class PendingFile:
    """One file of a snapshot, ready to write: JSON bytes, or tensors for safetensors."""

    name: str
    data: bytes | None = None
    tensors: dict[str, torch.Tensor] | None = None
    metadata: dict[str, str] | None = None

    @property
    def kind(self) -> str:
        return "json" if self.data is not None else "safetensors"

    @property
    def nbytes(self) -> int:
        if self.data is not None:
            return len(self.data)
        return sum(t.numel() * t.element_size() for t in (self.tensors or {}).values())


@dataclass(slots=True)
class ShardedPart:
    """What a snapshot leaves to DCP: a model and the state's optimizers, written by every
    process at write time (collectively, on the thread that writes) from the live objects."""

    model: nn.Module
    optimizers: list[torch.optim.Optimizer]
    keys: list[str]
    """The state's keys it covers, the model's first."""


@dataclass(slots=True)
class Snapshot:
    """Everything one rank writes for one checkpoint, detached from the live objects or not.

    With ``copied`` the tensors are private CPU copies (safe to write on a background thread
    while training continues); ``events`` are CUDA events the copies wait on.
    """

    rank: int
    world_size: int
    files: list[PendingFile] = field(default_factory=list)
    copied: bool = False
    events: list[Any] = field(default_factory=list)
    sharded: ShardedPart | None = None

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.files)


def _raw(t: torch.Tensor) -> np.ndarray:
    # (numel,) of any dtype -> (numel * itemsize,) uint8 NumPy view of the same memory.
    return t.reshape(-1).view(torch.uint8).numpy()


def _view_key(t: torch.Tensor) -> tuple[Any, ...]:
    # Two tensors with equal keys are the same view of the same memory (tied weights).
    return (
        t.device,
        t.untyped_storage().data_ptr(),
        t.storage_offset(),
        t.shape,
        t.stride(),
        t.dtype,
    )


class _Copier:
    """Turns live tensors into what a snapshot holds: the tensor itself, or a private copy.

    ``pool`` (kept by the caller across saves) holds last save's copies: copying into them
    skips allocating and first-touching fresh memory, about 2.5x faster on CPU (400 MB: 0.07 s
    instead of 0.17 s measured here), and pinned memory is slow to allocate. The caller must
    not reuse a pool while an earlier snapshot from it is still being written.
    """

    def __init__(self, copy: bool, pool: dict[tuple[str, str], torch.Tensor] | None) -> None:
        self.copy = copy
        self.pool = pool
        self.events: list[Any] = []
        self._jobs: list[tuple[np.ndarray, np.ndarray]] = []  # (destination, source) bytes

    def _buffer(self, key: tuple[str, str], t: torch.Tensor, pinned: bool) -> torch.Tensor:
        buf = self.pool.get(key) if self.pool is not None else None
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=pinned)
            if self.pool is not None:
                self.pool[key] = buf
        return buf

    def __call__(self, t: torch.Tensor, key: tuple[str, str]) -> torch.Tensor:
        t = t.detach()
        if not self.copy:
            return t
        if t.device.type == "cuda":
            # Pinned destination + non_blocking: the copy is queued on the stream and the
            # writer thread waits on the event, so the loop's thread never waits for the GPU.
            out = self._buffer(key, t, pinned=True)
            out.copy_(t, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.events.append(event)
            return out
        if t.device.type != "cpu":
            return t.to("cpu")
        buf = self._buffer(key, t, pinned=False)
        if t.is_contiguous() and t.numel() > 0:
            dst, src = _raw(buf), _raw(t)
            for start in range(0, len(src), _COPY_CHUNK):  # chunks balance the threads
                end = start + _COPY_CHUNK
                self._jobs.append((dst[start:end], src[start:end]))
            return buf
        return buf.copy_(t)

    def finish(self) -> None:
        """Run the queued CPU copies on a few threads; returns when all are done.

        Plain memcpys through NumPy (which releases the GIL): no OpenMP team to wait for on a
        busy machine, and two threads copy ~2x faster than one here (1.2 GB: 0.3-0.5 s
        against 0.7-0.9 s, measured on the 2-core dev machine under load).
        """
        jobs, self._jobs = self._jobs, []
        if not jobs:
            return
        workers = max(1, min(4, os.cpu_count() or 1, len(jobs)))
        if workers == 1:
            for dst, src in jobs:
                np.copyto(dst, src)
            return
        with ThreadPoolExecutor(workers, "stoker-snapshot") as pool:
            for future in [pool.submit(np.copyto, dst, src) for dst, src in jobs]:
                future.result()


def _tensor_file(
    name: str, tensors: Mapping[str, torch.Tensor], copier: _Copier, extra_meta: Mapping[str, str]
) -> PendingFile:
    """Deduplicate identical views (tied weights), copy if asked, record aliases."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[tuple[Any, ...], str] = {}
    for key, t in tensors.items():
        vk = _view_key(t)
        if vk in first and t.numel() > 0:
            aliases[key] = first[vk]
            continue
        first[vk] = key
        unique[key] = copier(t, (name, key))
    metadata = dict(extra_meta)
    if aliases:
        metadata[_ALIASES] = json.dumps(aliases, sort_keys=True)
    return PendingFile(name=name, tensors=unique, metadata=metadata or None)


def _json_bytes(tree: Any) -> bytes:
    # allow_nan: float('inf') in scheduler state (ReduceLROnPlateau) must round-trip.
    return (json.dumps(tree, allow_nan=True, separators=(",", ":")) + "\n").encode("utf-8")


def snapshot(
    state: Mapping[str, Any],
    *,
    rank: int = 0,
    world_size: int = 1,
    rank_state: Mapping[str, Any] | None = None,
    rng: bool = True,
    copy: bool = False,
    pool: dict[tuple[str, str], torch.Tensor] | None = None,
    sharded: str | None = None,
) -> Snapshot:
    """Collect the files this rank writes for ``state`` (rank 0 writes the shared ones).

    ``copy``: private CPU copies of every tensor (for a background write), made into the
    buffers of ``pool`` when given (see ``_Copier``). ``sharded``: the key of a model to write
    as shards with every optimizer of ``state`` (see :class:`ShardedPart`); it is not copied,
    so such a snapshot must be written before training goes on.
    """
    if not isinstance(state, Mapping):
        raise CheckpointError(
            f"checkpoint state must be a dict of name -> object, got {type(state).__name__}; "
            "e.g. save(path, {'model': model, 'optimizer': optimizer, 'step': step})"
        )
    bad = [k for k in state if not isinstance(k, str)]
    if bad:
        raise CheckpointError(f"checkpoint state keys must be strings; these are not: {bad!r}")
    copier = _Copier(copy, pool)
    snap = Snapshot(rank=rank, world_size=world_size, copied=copy)
    if sharded is not None:
        snap.sharded = _sharded_part(state, sharded)
    if rank == 0:
        entries: dict[str, Any] = {}
        tensors: dict[str, torch.Tensor] = {}
        used: set[str] = set()
        for key, obj in state.items():
            if snap.sharded is not None and key in snap.sharded.keys:
                role = "model" if key == sharded else "optimizer"
                entries[key] = {"kind": "sharded", "dir": SHARDED_DIR, "role": role}
            elif isinstance(obj, nn.Module):
                stem = key if _TAME.fullmatch(key) and key not in _RESERVED else ""
                if not stem or stem.startswith("rank-") or stem in used:
                    stem = f"module{len(used)}"
                used.add(stem)
                sd = unwrap_module(obj).state_dict()
                weights = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
                others = {k: v for k, v in sd.items() if not isinstance(v, torch.Tensor)}
                extra, extra_t = _tree.encode(others, f"{key}/extra")
                tensors.update(extra_t)
                snap.files.append(_tensor_file(f"{stem}.safetensors", weights, copier, {}))
                entries[key] = {"kind": "module", "file": f"{stem}.safetensors", "extra": extra}
            elif is_stateful(obj):
                tree, t = _tree.encode(obj.state_dict(), key)
                tensors.update(t)
                entries[key] = {"kind": "stateful", "data": tree}
            else:
                tree, t = _tree.encode(obj, key)
                tensors.update(t)
                entries[key] = {"kind": "data", "data": tree}
        snap.files.append(_tensor_file(STATE_TENSORS, tensors, copier, {}))
        snap.files.append(PendingFile(STATE_JSON, data=_json_bytes({"entries": entries})))
    if rank_state is not None:
        rank_state = {k: v.state_dict() if is_stateful(v) else v for k, v in rank_state.items()}
    per_rank = {"rng": capture_rng() if rng else None, "rank_state": rank_state}
    tree, t = _tree.encode(per_rank, "rank")
    stem = rank_stem(rank)
    snap.files.append(_tensor_file(f"{stem}.safetensors", t, copier, {}))
    snap.files.append(PendingFile(f"{stem}.json", data=_json_bytes(tree)))
    copier.finish()
    snap.events = copier.events
    return snap


def _sharded_part(state: Mapping[str, Any], key: str) -> ShardedPart:
    model = state.get(key)
    if not isinstance(model, nn.Module):
        raise CheckpointError(
            f"sharded={key!r} must name a model of the checkpoint state; it holds "
            f"{type(model).__name__}"
        )
    optimizers = [k for k, v in state.items() if isinstance(v, torch.optim.Optimizer)]
    return ShardedPart(
        model=unwrap_module(model),
        optimizers=[state[k] for k in optimizers],
        keys=[key, *optimizers],
    )


# ------------------------------------------------------------------------------------ read


def read_json(path: Path, *, expect: type = dict, limit: int = JSON_LIMIT) -> Any:
    """A checkpoint's JSON file: a regular file of at most ``limit`` bytes whose top level is
    ``expect`` (see :mod:`stoker.safe_files`)."""
    try:
        return safe_files.read_json(path, expect=expect, limit=limit, error=CheckpointError)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing") from None


def read_tensors(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file through the official parser, restoring deduplicated aliases."""
    from safetensors import safe_open

    try:
        safe_files.check_regular(path, error=CheckpointError)  # the parser maps it by name
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
            metadata = f.metadata() or {}
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing") from None
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors raises its own SafetensorError for bad headers
        raise CheckpointError(f"checkpoint file {path} is not valid safetensors ({exc})") from None
    try:
        aliases = json.loads(metadata.get(_ALIASES, "{}"))
        for alias, target in aliases.items():
            tensors[alias] = tensors[target]
    except (ValueError, AttributeError, KeyError, TypeError):
        raise CheckpointError(
            f"checkpoint file {path} has malformed {_ALIASES} metadata; it is not a file "
            "stoker wrote"
        ) from None
    return tensors
