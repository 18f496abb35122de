"""Sharded checkpoints of a model and its optimizer: DCP with safetensors storage, no pickle.

Each process writes its own shards through ``torch.distributed.checkpoint`` (DCP) with
``HuggingFaceStorageWriter(save_distributed=True)``, and any number of processes reads them
back (resharding: 2 -> 1, 1 -> 2, ...). The state goes through DCP's
``get_state_dict`` / ``set_state_dict``, so it works for FSDP2 (DTensor shards), DDP and plain
modules alike. A directory holds::

    model/shard-00001-model-00001-of-00001.safetensors   # one file per process that held data
    model/shard-00002-model-00001-of-00001.safetensors
    optim/shard-0000N-model-00001-of-00001.safetensors   # exp_avg, exp_avg_sq, step, ...
    sharded.json               # format, tied-weight aliases, param_groups, non-tensor state

Each safetensors header carries, per tensor, the offsets of its shard in the full tensor
(``DCP_SHARDING_INFO``, JSON): that is all the metadata a reader needs. DCP's own ``.metadata``
file is a pickle; this storage does not write it (``HuggingFaceStorageWriter.finish`` skips it
for distributed saves) and the reader rebuilds the metadata from the headers, so **loading
never unpickles** (tests/checkpoint/test_sharded.py loads with ``pickle`` and ``torch.load``
patched to raise). Loading needs no collective either: every process plans and reads its own
slices (``no_dist=True``), so not even DCP's in-memory exchange of plans between processes
(which pickles) runs.

Optimizer tensors (AdamW's ``exp_avg``, ``exp_avg_sq`` and its 0-d ``step``) are sharded like
the parameters they belong to; what safetensors cannot hold (``param_groups``: lr, betas,
weight decay, the parameter names of each group; any non-tensor per-parameter state) goes to
``sharded.json`` (JSON), written by the first process. A tied weight (one parameter under two
names, which safetensors refuses to write twice) is written under its first name; the JSON
lists the others.

:func:`export_consolidated` turns the model shards into one ``model.safetensors`` of full
tensors (what ``safetensors.torch.load_file`` and ``stoker compress`` read).

Limits: the directory must be new or empty (stale shards of another world size would be read
as part of the checkpoint); every process must call :func:`save_sharded` (it is collective)
while :func:`load_sharded` may be called by any subset; the model's state must be tensors
(no ``get_extra_state`` objects).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import safetensors.torch
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from stoker import safe_files
from stoker.checkpoint.errors import CheckpointError, CheckpointMismatch

__all__ = ["Optimizers", "check_sharded", "export_consolidated", "load_sharded", "save_sharded"]

MODEL_DIR = "model"
OPTIM_DIR = "optim"
JSON_FILE = "sharded.json"
_FORMAT = 1
_SUFFIX = ".safetensors"
_JSON_LIMIT = 64 << 20  # bytes: param groups and aliases, a few KB


Optimizers = torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None
"""One optimizer, several (their states are stored together, by parameter name), or none."""


def _as_list(optimizers: Optimizers) -> list[torch.optim.Optimizer]:
    if optimizers is None:
        return []
    if isinstance(optimizers, torch.optim.Optimizer):
        return [optimizers]
    return list(optimizers)


def save_sharded(
    directory: str | os.PathLike[str],
    model: nn.Module,
    optimizer: Optimizers = None,
) -> Path:
    """Write this process's shards of ``model`` (and ``optimizer``, or several) into
    ``directory``.

    Collective: every process of the default group calls it with its own shards (one process
    without torch.distributed works too). ``directory`` must not exist or be empty.
    Returns the directory.

    Optimizers that have not stepped yet (no state) are recorded as such and their (empty)
    state is not written: building it would take an optimizer step, which changes a live
    optimizer (Adam's step count).
    """
    root = Path(directory)
    for sub in (MODEL_DIR, OPTIM_DIR):
        stale = sorted(p.name for p in (root / sub).glob(f"*{_SUFFIX}"))
        if stale:
            raise CheckpointError(
                f"{root / sub} already holds {stale}; a sharded checkpoint goes into a new "
                "directory (old shards would be read as part of it)."
            )
    optimizers = _as_list(optimizer)
    stepped = any(opt.state for opt in optimizers)
    if stepped:
        model_sd, optim_sd = get_state_dict(model, optimizers)
    else:
        model_sd, optim_sd = get_model_state_dict(model), {}
    for key, value in model_sd.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"Model state {key!r} is a {type(value).__name__}; sharded checkpoints hold "
                "tensors only (save other state with stoker.checkpoint.save)."
            )
    aliases = _aliases(model, model_sd)
    for alias in aliases:  # safetensors refuses two names for one storage
        del model_sd[alias]
    tensors, plain = _split_optimizer_state(optim_sd)
    saved_optimizer: dict[str, Any] | None = None
    if optimizers:
        saved_optimizer = {**plain, "count": len(optimizers), "stepped": stepped}
    if (dist.get_rank() if dist.is_initialized() else 0) == 0:
        root.mkdir(parents=True, exist_ok=True)
        record = {"format": _FORMAT, "aliases": aliases, "optimizer": saved_optimizer}
        _write_json(root / JSON_FILE, record)
    # After the JSON: these saves' collectives make every process wait for it.
    if stepped:
        _dcp_save(tensors, root / OPTIM_DIR)
    _dcp_save(model_sd, root / MODEL_DIR)
    return root


def check_sharded(directory: str | os.PathLike[str], model: nn.Module) -> None:
    """Raise :class:`CheckpointMismatch` if the model state in ``directory`` does not fit
    ``model`` (keys or full shapes), touching nothing; :class:`CheckpointError` if it is not a
    sharded checkpoint."""
    root = Path(directory)
    record = _read_json(root)
    stored = _stored_shapes(root / MODEL_DIR)
    wanted = {
        k: tuple(v.shape)
        for k, v in get_model_state_dict(model).items()
        if k not in record["aliases"] and isinstance(v, torch.Tensor)
    }
    _check_keys(set(wanted), set(stored), root / MODEL_DIR, "model")
    wrong = [
        f"{k}: {stored[k]} saved, {shape} here" for k, shape in wanted.items() if stored[k] != shape
    ]
    if wrong:
        raise CheckpointMismatch(
            f"The model state in {root} does not fit: {'; '.join(wrong[:3])}"
            f"{' ...' if len(wrong) > 3 else ''}; build the model with the configuration "
            "that produced the checkpoint."
        )


def load_sharded(
    directory: str | os.PathLike[str],
    model: nn.Module,
    optimizer: Optimizers = None,
) -> None:
    """Load a :func:`save_sharded` checkpoint into ``model`` (and its optimizers), in place.

    ``model`` may be sharded differently from the saving run (other world size, FSDP or not):
    each process reads exactly the slices its parameters and optimizer state cover. Nothing is
    unpickled and no collective runs. Raises :class:`CheckpointMismatch` naming the missing
    and unexpected keys if the checkpoint does not fit the model.
    """
    root = Path(directory)
    record = _read_json(root)
    optimizers = _as_list(optimizer)
    saved = record["optimizer"]
    if optimizers and saved is None:
        raise CheckpointError(
            f"{root} was saved without an optimizer; call load_sharded(directory, model) "
            "without one."
        )
    if optimizers and saved.get("count", 1) != len(optimizers):
        raise CheckpointMismatch(
            f"{root} holds the state of {saved.get('count', 1)} optimizer(s); "
            f"{len(optimizers)} were given."
        )
    stepped = bool(optimizers) and saved.get("stepped", True)
    if stepped:
        # Creates the optimizers' state (one step with zero gradients and lr 0) if they have
        # none, so that there are tensors of the right shard shapes to read into.
        model_sd, optim_sd = get_state_dict(model, optimizers)
    else:
        model_sd, optim_sd = get_model_state_dict(model), {}
    aliases: dict[str, str] = record["aliases"]
    stored = {k: v for k, v in model_sd.items() if k not in aliases}
    _dcp_load(stored, root / MODEL_DIR, what="model")
    for alias, name in aliases.items():
        model_sd[alias] = model_sd[name]
    if not stepped:
        set_model_state_dict(model, model_sd)
        return
    tensors, _ = _split_optimizer_state(optim_sd)
    _dcp_load(tensors, root / OPTIM_DIR, what="optimizer")
    state: dict[str, dict[str, Any]] = tensors.get("state", {})
    for fqn, entries in saved["state"].items():
        state.setdefault(fqn, {}).update(entries)
    groups = [_decode_group(g) for g in saved["param_groups"]]
    set_state_dict(
        model,
        optimizers,
        model_state_dict=model_sd,
        optim_state_dict=cast(Any, {"state": state, "param_groups": groups}),
        options=StateDictOptions(strict=True),
    )


def export_consolidated(
    checkpoint_dir: str | os.PathLike[str], out_file: str | os.PathLike[str]
) -> Path:
    """Write the full (unsharded) model weights of a sharded checkpoint to one safetensors file.

    Runs in one process, without torch.distributed; reads every shard once. The file holds the
    unsharded model's ``state_dict()`` keys and values (a tied weight under each of its names);
    it is written to a temporary name and renamed, so ``out_file`` is either complete or absent.
    """
    root = Path(checkpoint_dir)
    record = _read_json(root)
    reader = HuggingFaceStorageReader(str(_shard_dir(root / MODEL_DIR)))
    metadata = reader.read_metadata()
    full: dict[str, Any] = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if isinstance(meta, TensorStorageMetadata)  # safetensors holds nothing else
    }
    _read(full, reader)
    for alias, name in record["aliases"].items():
        full[alias] = full[name].clone()  # a file holds each name's own copy
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    safetensors.torch.save_file(full, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out)
    return out


def _aliases(model: nn.Module, model_sd: dict[str, Any]) -> dict[str, str]:
    """``{alias: name}`` for parameters and buffers registered under several names (tied
    weights), by identity, so every process decides alike; the first name is kept."""
    first: dict[int, str] = {}
    aliases = {}
    tensors: list[tuple[str, torch.Tensor]] = [*model.named_parameters(remove_duplicate=False)]
    tensors += model.named_buffers(remove_duplicate=False)
    for raw, tensor in tensors:
        name = raw.replace("_checkpoint_wrapped_module.", "")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            name = name.removeprefix("module.")
        if name not in model_sd:
            continue
        if id(tensor) in first:
            aliases[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
    return aliases


def _read_json(root: Path) -> dict[str, Any]:
    path = root / JSON_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{root} has no {JSON_FILE}; pass a directory written by save_sharded()."
        )
    record = safe_files.read_json(path, expect=dict, limit=_JSON_LIMIT, error=CheckpointError)
    if record.get("format") != _FORMAT:
        raise CheckpointError(
            f"{path} has format {record.get('format')!r}; this stoker reads format {_FORMAT}."
        )
    aliases, optimizer = record.get("aliases"), record.get("optimizer")
    if not (
        isinstance(aliases, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items())
        and (
            optimizer is None
            or (
                isinstance(optimizer, dict)
                and isinstance(optimizer.get("state"), dict)
                and isinstance(optimizer.get("param_groups"), list)
            )
        )
    ):
        raise CheckpointError(f"{path} is malformed (aliases or optimizer); it was not used.")
    return record


def _dcp_save(state: dict[str, Any], path: Path) -> None:
    writer = HuggingFaceStorageWriter(str(path), save_distributed=True, enable_consolidation=False)
    with warnings.catch_warnings():  # one process without torch.distributed is fine here
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        try:
            dcp.save(state, storage_writer=writer)
        except CheckpointException as exc:  # a BaseException: every rank gets the failures
            first = next(iter(exc.failures.values()), exc)
            if isinstance(first, OSError):
                raise first from None
            raise CheckpointError(f"writing shards to {path} failed: {first!r}") from None


def _dcp_load(state: dict[str, Any], path: Path, *, what: str) -> None:
    """Read ``state``'s tensors in place from ``path``, after checking the keys match."""
    reader = HuggingFaceStorageReader(str(_shard_dir(path)))
    stored = set(reader.read_metadata().state_dict_metadata)
    _check_keys(set(_flat_keys(state)), stored, path, what)
    _read(state, reader)


def _stored_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The full shape of every tensor in the shards under ``path`` (headers only)."""
    reader = HuggingFaceStorageReader(str(_shard_dir(path)))
    return {
        key: tuple(meta.size)
        for key, meta in reader.read_metadata().state_dict_metadata.items()
        if isinstance(meta, TensorStorageMetadata)
    }


def _check_keys(wanted: set[str], stored: set[str], path: Path, what: str) -> None:
    if stored != wanted:
        missing, unexpected = sorted(wanted - stored), sorted(stored - wanted)
        raise CheckpointMismatch(
            f"The {what} state in {path} does not fit: missing keys {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''}, unexpected keys {unexpected[:10]}"
            f"{' ...' if len(unexpected) > 10 else ''}. Was it saved from another model "
            "or optimizer?"
        )


def _read(state: dict[str, Any], reader: HuggingFaceStorageReader) -> None:
    # no_dist: each process plans its own reads from the safetensors headers; no collective,
    # hence no pickled exchange of plans between processes.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(state, storage_reader=reader, no_dist=True)


def _shard_dir(path: Path) -> Path:
    if not any(path.glob(f"*{_SUFFIX}")):
        raise CheckpointError(
            f"{path} holds no {_SUFFIX} shards; pass the directory save_sharded() wrote."
        )
    return path


def _flat_keys(state: dict[str, Any], prefix: str = "") -> list[str]:
    """DCP's flattened names: ``{"state": {"w": {"step": t}}}`` -> ``["state.w.step"]``."""
    keys = []
    for key, value in state.items():
        if isinstance(value, dict):
            keys += _flat_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def _split_optimizer_state(
    optim_sd: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(tensors, plain)``: ``{"state": {fqn: {name: tensor}}}`` for DCP, and for JSON
    ``{"state": {fqn: {name: number}}, "param_groups": [...]}``."""
    tensors: dict[str, dict[str, Any]] = {}
    plain: dict[str, dict[str, Any]] = {}
    for fqn, entries in optim_sd.get("state", {}).items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors.setdefault(fqn, {})[name] = value
            elif isinstance(value, bool | int | float | str) or value is None:
                plain.setdefault(fqn, {})[name] = value
            else:
                raise TypeError(
                    f"Optimizer state {fqn}.{name} is a {type(value).__name__}; sharded "
                    "checkpoints hold tensors and JSON numbers/strings only."
                )
    groups = [_encode_group(g) for g in optim_sd.get("param_groups", [])]
    return {"state": tensors} if tensors else {}, {"state": plain, "param_groups": groups}


def _encode_group(group: dict[str, Any]) -> dict[str, Any]:
    """A param group as JSON: tuples (betas) and 0-d tensors (a tensor lr) are tagged."""
    out: dict[str, Any] = {}
    for key, value in group.items():
        if isinstance(value, torch.Tensor):
            out[key] = {"tensor": value.tolist(), "dtype": str(value.dtype).removeprefix("torch.")}
        elif isinstance(value, tuple):
            out[key] = {"tuple": list(value)}
        else:
            out[key] = value
    json.dumps(out)  # fails here, naming nothing written yet, if a value is not JSON
    return out


def _decode_group(group: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in group.items():
        if isinstance(value, dict) and set(value) == {"tensor", "dtype"}:
            out[key] = torch.tensor(value["tensor"], dtype=getattr(torch, value["dtype"]))
        elif isinstance(value, dict) and set(value) == {"tuple"}:
            out[key] = tuple(value["tuple"])
        else:
            out[key] = value
    return out


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())  # as durable as DCP's shards (fsynced) before the rename
    os.replace(tmp, path)
