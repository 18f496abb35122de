"""``save`` and ``load``: atomic, verified, pickle-free checkpoints of a dict of objects.

    >>> import tempfile, torch
    >>> from stoker.checkpoint import load, save
    >>> model = torch.nn.Linear(2, 2)
    >>> opt = torch.optim.AdamW(model.parameters())
    >>> root = tempfile.mkdtemp()
    >>> path = save(f"{root}/step-000010", {"model": model, "optimizer": opt, "step": 10})
    >>> state = {"model": model, "optimizer": opt, "step": 0}
    >>> rest = load(path, state)   # restores model and optimizer in place
    >>> state["step"], rest
    (10, {})

Atomicity: files go into ``.tmp-<name>/`` beside the target, each fsynced; the manifest is
written last; the directory is fsynced, renamed to ``<name>/``, and the parent fsynced. A crash
at any point leaves either the old checkpoints untouched plus a ``.tmp-*`` leftover, or the new
checkpoint complete. A failed save (full disk, no permission) removes its temporary directory
and raises :class:`CheckpointError`; nothing written earlier is touched.

Under ``torch.distributed`` every rank calls ``save`` with the same path: rank 0 writes the
shared state (DDP replicas are identical), every rank writes its own RNG states, and the
directory must be on a filesystem all ranks share.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stoker.checkpoint import _tree
from stoker.checkpoint._dist import Coordinator
from stoker.checkpoint._files import fsync_dir, sha256_file, write_bytes, write_safetensors
from stoker.checkpoint.errors import CheckpointError, CheckpointWarning
from stoker.checkpoint.manifest import FileEntry, Manifest, read_manifest, verify
from stoker.checkpoint.rng import restore_rng
from stoker.checkpoint.state import (
    STATE_JSON,
    STATE_TENSORS,
    Snapshot,
    is_stateful,
    rank_stem,
    read_json,
    read_tensors,
    snapshot,
    unwrap_module,
)

__all__ = ["load", "save", "write_snapshot"]


def save(
    directory: str | Path,
    state: Mapping[str, Any],
    *,
    rank_state: Mapping[str, Any] | None = None,
    rng: bool = True,
    step: int | None = None,
) -> Path:
    """Write ``state`` as a checkpoint directory at ``directory``; returns its path.

    ``state`` values: ``nn.Module`` (weights to ``<key>.safetensors``), objects with
    ``state_dict()``/``load_state_dict()`` (optimizers, schedulers, scalers, samplers), or plain
    data (numbers, strings, lists, dicts, tensors, NumPy arrays). ``rank_state`` is per-process
    data (each rank's own). ``rng`` also saves every RNG state of this process. ``step`` goes
    into the manifest (by default it is parsed from a ``step-000123`` directory name).
    """
    directory = Path(directory)
    coord = Coordinator()
    snap = snapshot(
        state, rank=coord.rank, world_size=coord.world_size, rank_state=rank_state, rng=rng
    )
    return write_snapshot(directory, snap, coord, step=step)


def _step_from_name(name: str) -> int | None:
    head, _, digits = name.rpartition("-")
    return int(digits) if head and digits.isdigit() else None


def _explain(exc: OSError) -> str:
    what = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        return f"{what} (disk full: free space, or keep fewer checkpoints with keep_last)"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{what} (no permission: check the directory is writable by this user)"
    if exc.errno == errno.EDQUOT:
        return f"{what} (disk quota exceeded: free space or raise the quota)"
    return what


def write_snapshot(
    directory: Path, snap: Snapshot, coord: Coordinator, *, step: int | None = None
) -> Path:
    """Write ``snap`` atomically to ``directory`` (every rank calls this; see :func:`save`)."""
    directory = Path(directory)
    parent = directory.parent
    tmp = parent / f".tmp-{directory.name}"
    failure: BaseException | None = None
    where = str(tmp)

    def attempt(fn: Any) -> None:
        nonlocal failure
        if failure is None:
            try:
                fn()
            except (OSError, TypeError, ValueError) as exc:
                failure = exc

    def prepare() -> None:
        parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # leftover of a crashed save of the same step
            shutil.rmtree(tmp)
        tmp.mkdir()

    if coord.rank == 0:
        attempt(prepare)
    ok = coord.all_ok(failure is None)

    written: dict[str, FileEntry] = {}

    def write_files() -> None:
        nonlocal where
        for event in snap.events:  # CUDA copies of an async snapshot
            event.synchronize()
        for f in snap.files:
            where = str(tmp / f.name)
            if f.data is not None:
                digest, size = write_bytes(tmp / f.name, f.data)
            else:
                digest, size = write_safetensors(tmp / f.name, f.tensors or {}, f.metadata)
            written[f.name] = FileEntry(digest, size, f.kind)

    if ok:
        attempt(write_files)
    ok = coord.all_ok(ok and failure is None)

    def finish() -> None:
        nonlocal where
        files = dict(written)
        for r in range(1, coord.world_size):  # other ranks' files, on the shared filesystem
            for suffix, kind in ((".json", "json"), (".safetensors", "safetensors")):
                name = rank_stem(r) + suffix
                where = str(tmp / name)
                digest, size = sha256_file(tmp / name)
                files[name] = FileEntry(digest, size, kind)
        manifest = Manifest(
            step=step if step is not None else _step_from_name(directory.name),
            world_size=coord.world_size,
            created=Manifest.now(),
            files=files,
        )
        where = str(tmp / "manifest.json")
        manifest.write(tmp)
        fsync_dir(tmp)
        where = str(directory)
        _publish(tmp, directory)
        fsync_dir(parent)

    if ok and coord.rank == 0:
        attempt(finish)
    ok = coord.all_ok(ok and failure is None)
    if ok:
        return directory
    if coord.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    if failure is None:
        raise CheckpointError(
            f"could not save checkpoint {directory}: another rank failed (its message says why); "
            "earlier checkpoints are untouched"
        )
    reason = _explain(failure) if isinstance(failure, OSError) else str(failure)
    if isinstance(failure, OSError):
        raise CheckpointError(
            f"could not save checkpoint {directory}: {reason} while writing {where}; "
            "earlier checkpoints are untouched"
        ) from failure
    raise CheckpointError(f"could not save checkpoint {directory}: {reason}") from failure


def _publish(tmp: Path, directory: Path) -> None:
    if not directory.exists():
        os.rename(tmp, directory)
        return
    # Replacing an existing checkpoint of the same name: rename() cannot replace a non-empty
    # directory, so move the old one aside first; it is deleted only after the new one is in.
    old = directory.parent / f".old-{directory.name}-{os.getpid()}"
    os.rename(directory, old)
    os.rename(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------ load


def _load_module(
    module: nn.Module, path: Path, extra: Mapping[str, Any], key: str, strict: bool
) -> None:
    weights: dict[str, Any] = dict(read_tensors(path))
    weights.update(extra)
    target = unwrap_module(module)
    try:
        result = target.load_state_dict(weights, strict=False)
    except RuntimeError as exc:  # shape mismatches
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise CheckpointError(
            f"checkpoint {path.parent}: {key!r} does not fit the model ({detail}); "
            "build the model with the configuration that produced the checkpoint"
        ) from None
    if strict and (result.missing_keys or result.unexpected_keys):
        raise CheckpointError(
            f"checkpoint {path.parent}: {key!r} does not match the model: missing "
            f"{result.missing_keys[:5]}{'…' if len(result.missing_keys) > 5 else ''}, unexpected "
            f"{result.unexpected_keys[:5]}{'…' if len(result.unexpected_keys) > 5 else ''}; "
            "pass strict=False to load what matches"
        )


def load(
    directory: str | Path,
    state: dict[str, Any],
    *,
    rank_state: dict[str, Any] | None = None,
    strict: bool = True,
    verify_checksums: bool = True,
    rng: bool = True,
) -> dict[str, Any]:
    """Restore ``state`` in place from the checkpoint at ``directory``; returns the rest.

    Modules and stateful objects are loaded in place; plain-data values of ``state`` are
    replaced by the saved ones. Entries of the checkpoint that ``state`` does not name are
    returned (modules as their state dict). ``strict``: every key of ``state`` must be in the
    checkpoint and module weights must match exactly. ``rng`` restores this rank's RNG states;
    ``rank_state`` (a dict) is updated with this rank's per-process data.

    Every file is checked against the manifest's SHA-256 first (``verify_checksums``), and only
    read through ``json`` or ``safetensors``: loading a checkpoint never runs code.
    """
    directory = Path(directory)
    if directory.is_file():
        raise CheckpointError(
            f"{directory} is a file; stoker checkpoints are directories (step-000100/) and are "
            "never read with pickle. For a torch.save file use "
            "torch.load(path, weights_only=True) yourself"
        )
    manifest = verify(directory) if verify_checksums else read_manifest(directory)
    for required in (STATE_JSON, STATE_TENSORS):
        if required not in manifest.files:
            raise CheckpointError(f"checkpoint {directory}: manifest does not list {required}")
    entries: dict[str, Any] = read_json(directory / STATE_JSON)["entries"]
    tensors = read_tensors(directory / STATE_TENSORS)

    def listed(name: str) -> Path:
        if name not in manifest.files:
            raise CheckpointError(f"checkpoint {directory}: {name} is not in its manifest")
        return directory / name

    missing = [k for k in state if k not in entries]
    if missing and strict:
        raise CheckpointError(
            f"checkpoint {directory} has no {missing}; it holds {sorted(entries)}; "
            "pass strict=False to skip them"
        )
    try:
        for key, obj in state.items():
            if key not in entries:
                continue
            entry = entries[key]
            kind = entry["kind"]
            if isinstance(obj, nn.Module):
                if kind != "module":
                    raise CheckpointError(
                        f"checkpoint {directory}: {key!r} was saved as {kind}, not a module"
                    )
                extra = _tree.decode(entry["extra"], tensors)
                _load_module(obj, listed(entry["file"]), extra, key, strict)
            elif is_stateful(obj):
                if kind == "module":
                    obj.load_state_dict(read_tensors(listed(entry["file"])))
                else:
                    obj.load_state_dict(_tree.decode(entry["data"], tensors))
            elif kind == "module":
                state[key] = read_tensors(listed(entry["file"]))
            else:
                state[key] = _tree.decode(entry["data"], tensors)
        rest: dict[str, Any] = {}
        for key, entry in entries.items():
            if key in state:
                continue
            if entry["kind"] == "module":
                rest[key] = read_tensors(listed(entry["file"]))
            else:
                rest[key] = _tree.decode(entry["data"], tensors)
        _load_rank(directory, manifest.world_size, listed, rank_state, rng)
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"checkpoint {directory}: malformed state ({exc!r})") from None
    return rest


def _load_rank(
    directory: Path,
    saved_world: int,
    listed: Any,
    rank_state: dict[str, Any] | None,
    rng: bool,
) -> None:
    import warnings

    rank = torch.distributed.get_rank() if _dist_on() else 0
    stem = rank_stem(rank)
    if rank >= saved_world:
        warnings.warn(
            f"checkpoint {directory} was saved by {saved_world} processes; rank {rank} has no "
            "RNG state there and keeps its current one (resumed runs on a different number of "
            "processes are not bitwise exact)",
            CheckpointWarning,
            stacklevel=3,
        )
        return
    tree = read_json(listed(f"{stem}.json"))
    per_rank = _tree.decode(tree, read_tensors(listed(f"{stem}.safetensors")))
    if rng and per_rank.get("rng") is not None:
        restore_rng(per_rank["rng"])
    if rank_state is not None and per_rank.get("rank_state") is not None:
        saved = per_rank["rank_state"]
        for key, obj in list(rank_state.items()):
            if key in saved:
                if is_stateful(obj):
                    obj.load_state_dict(saved[key])
                else:
                    rank_state[key] = saved[key]
        for key, value in saved.items():
            rank_state.setdefault(key, value)


def _dist_on() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()
