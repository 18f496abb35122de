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
checkpoint complete. (Saving over a checkpoint of the same name moves the old one to
``.old-<name>-<pid>`` for the instant between two renames; a crash exactly there loses that
one checkpoint, never promoted back by a later process: resuming uses the one before it.) A
failed save (full disk, no permission) removes its temporary directory and raises
:class:`CheckpointError`; nothing written earlier is touched.

Under ``torch.distributed`` every rank calls ``save`` with the same path: rank 0 writes the
shared state (DDP replicas are identical), every rank writes its own RNG states, and the
directory must be on a filesystem all ranks share.
"""

from __future__ import annotations

import errno
import os
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stoker.checkpoint import _tree
from stoker.checkpoint._dist import Coordinator
from stoker.checkpoint._files import fsync_dir, sha256_file, write_bytes, write_safetensors
from stoker.checkpoint.errors import CheckpointError, CheckpointMismatch, CheckpointWarning
from stoker.checkpoint.manifest import FileEntry, Manifest, read_manifest, verify
from stoker.checkpoint.rng import check_rng, restore_rng
from stoker.checkpoint.state import (
    SHARDED_DIR,
    STATE_JSON,
    STATE_TENSORS,
    Snapshot,
    is_sharded,
    is_stateful,
    rank_stem,
    read_json,
    read_tensors,
    snapshot,
    unwrap_module,
)
from stoker.errors import StokerError

__all__ = ["Restore", "load", "prepare_load", "save", "write_snapshot"]

_SHARD_KINDS = {".json": "json", ".safetensors": "safetensors"}


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
            except (OSError, TypeError, ValueError, CheckpointError) as exc:
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
        if snap.sharded is not None:  # collective: every rank writes its shards
            from stoker.checkpoint.sharded import save_sharded  # imports DCP: only when used

            part = snap.sharded
            where = str(tmp / SHARDED_DIR)
            save_sharded(tmp / SHARDED_DIR, part.model, part.optimizers)

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
        if snap.sharded is not None:  # every rank's shards, on the shared filesystem
            for path in sorted((tmp / SHARDED_DIR).rglob("*")):
                if path.is_dir():
                    continue
                name = path.relative_to(tmp).as_posix()
                where = str(path)
                digest, size = sha256_file(path)
                files[name] = FileEntry(digest, size, _SHARD_KINDS[path.suffix])
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
    # Only this call may put it back (its own rename failed): a ``.old-*`` directory found
    # later is never promoted, since nothing proves who wrote it (see remove_leftovers).
    old = directory.parent / f".old-{directory.name}-{os.getpid()}"
    os.rename(directory, old)
    try:
        os.rename(tmp, directory)
    except OSError:
        os.rename(old, directory)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------ load


def _fits(saved: torch.Size, param: torch.Size) -> bool:
    # A per-parameter optimizer tensor has the parameter's shape, or a shape broadcasting to
    # it in place (Adafactor's factored row / column variances: (n, 1) and (1, m) for (n, m)).
    return len(saved) == len(param) and all(a in (b, 1) for a, b in zip(saved, param, strict=True))


def _check_module(
    module: nn.Module, weights: Mapping[str, Any], directory: Path, key: str, strict: bool
) -> None:
    """Refuse weights that do not fit ``module`` before anything is copied into it."""
    if is_sharded(unwrap_module(module)):
        raise CheckpointMismatch(
            f"checkpoint {directory}: {key!r} holds full weights but this model is sharded "
            "(FSDP); resume it with the strategy that wrote it (ddp, or one process)"
        )
    expected = unwrap_module(module).state_dict()
    wrong = [
        f"{name}: checkpoint {tuple(t.shape)}, model {tuple(expected[name].shape)}"
        for name, t in weights.items()
        if isinstance(t, torch.Tensor)
        and isinstance(expected.get(name), torch.Tensor)
        and t.shape != expected[name].shape
    ]
    if wrong:
        more = f"; {len(wrong) - 3} more" if len(wrong) > 3 else ""
        raise CheckpointMismatch(
            f"checkpoint {directory}: {key!r} does not fit the model ({'; '.join(wrong[:3])}"
            f"{more}); build the model with the configuration that produced the checkpoint"
        )
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    if strict and (missing or unexpected):
        raise CheckpointMismatch(
            f"checkpoint {directory}: {key!r} does not match the model: missing "
            f"{missing[:5]}{'…' if len(missing) > 5 else ''}, unexpected "
            f"{unexpected[:5]}{'…' if len(unexpected) > 5 else ''}; "
            "pass strict=False to load what matches"
        )


def _check_optimizer(
    optimizer: torch.optim.Optimizer, saved: Any, directory: Path, key: str
) -> None:
    """Refuse optimizer state that does not fit ``optimizer``'s parameters.

    torch checks the number of parameters per group but not the shapes of the per-parameter
    tensors (Adam's moments, SGD's momentum): a wrong one loads, and fails at the first
    ``optimizer.step()``, or worse, broadcasts.
    """
    if not isinstance(saved, dict):
        raise CheckpointError(f"checkpoint {directory}: {key!r} is not an optimizer state")
    groups, state = saved.get("param_groups"), saved.get("state")
    if not isinstance(groups, list) or not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {directory}: {key!r} is not an optimizer state")
    sizes = [len(g.get("params", ())) if isinstance(g, dict) else -1 for g in groups]
    current = [len(g["params"]) for g in optimizer.param_groups]
    if sizes != current:
        raise CheckpointMismatch(
            f"checkpoint {directory}: {key!r} holds {sizes} parameters per group, the optimizer "
            f"has {current}; build the optimizer over the same parameters as the run that saved it"
        )
    # LBFGS keeps flat vectors over all its parameters under the first one.
    if isinstance(getattr(optimizer, "optimizer", optimizer), torch.optim.LBFGS):
        return
    params = {
        pid: p
        for saved_group, group in zip(groups, optimizer.param_groups, strict=True)
        for pid, p in zip(saved_group["params"], group["params"], strict=True)
    }
    for pid, entry in state.items():
        if not isinstance(entry, dict) or pid not in params:
            continue
        param = params[pid]
        for name, t in entry.items():
            if isinstance(t, torch.Tensor) and t.dim() > 0 and not _fits(t.shape, param.shape):
                raise CheckpointError(
                    f"checkpoint {directory}: {key!r} holds {name!r} of shape {tuple(t.shape)} "
                    f"for a parameter of shape {tuple(param.shape)}; the checkpoint is "
                    "inconsistent (damaged, or not written by this model's run)"
                )


class Restore:
    """A checkpoint read, decoded and checked against the live objects; :meth:`apply` puts it
    into them. Nothing is touched before ``apply``, so a checkpoint refused while preparing
    leaves every object as it was (and a resume can fall back to an older one)."""

    def __init__(self, directory: Path, manifest: Manifest) -> None:
        self.directory = directory
        self.manifest = manifest
        self.rest: dict[str, Any] = {}
        self._actions: list[tuple[str, Any]] = []

    def _then(self, what: str, action: Any) -> None:
        self._actions.append((what, action))

    def apply(self) -> dict[str, Any]:
        """Restore the objects in place; returns the entries nobody asked for."""
        for what, action in self._actions:
            try:
                action()
            except StokerError:
                raise
            except Exception as exc:
                raise CheckpointError(
                    f"checkpoint {self.directory}: restoring {what} failed ({exc!r}); the objects "
                    "before it are already restored: restart the process before retrying"
                ) from None
        return self.rest


def prepare_load(
    directory: str | Path,
    state: dict[str, Any],
    *,
    rank_state: dict[str, Any] | None = None,
    strict: bool = True,
    verify_checksums: bool = True,
    rng: bool = True,
    root: Path | None = None,
) -> Restore:
    """Read, decode and check a checkpoint for ``state`` (see :func:`load`); touches nothing.

    Raises :class:`CheckpointMismatch` when the checkpoint is intact but does not fit (keys,
    module shapes, optimizer groups, or an object's own ``check_state_dict``), and
    :class:`CheckpointError` when it is damaged or inconsistent.
    """
    directory = Path(directory)
    if directory.is_file():
        raise CheckpointError(
            f"{directory} is a file; stoker checkpoints are directories (step-000100/) and are "
            "never read with pickle. For a torch.save file use "
            "torch.load(path, weights_only=True) yourself"
        )
    manifest = (
        verify(directory, root=root) if verify_checksums else read_manifest(directory, root=root)
    )
    for required in (STATE_JSON, STATE_TENSORS):
        if required not in manifest.files:
            raise CheckpointError(f"checkpoint {directory}: manifest does not list {required}")

    def listed(name: str) -> Path:
        if name not in manifest.files:
            raise CheckpointError(f"checkpoint {directory}: {name} is not in its manifest")
        return directory / name

    doc = read_json(directory / STATE_JSON, limit=manifest.files[STATE_JSON].bytes)
    entries = doc.get("entries")
    if not isinstance(entries, dict) or not all(
        isinstance(e, dict) and e.get("kind") in ("module", "stateful", "data", "sharded")
        for e in entries.values()
    ):
        raise CheckpointError(
            f"checkpoint {directory}: {STATE_JSON} has no valid 'entries'; it is not a file "
            "stoker wrote"
        )
    missing = [k for k in state if k not in entries]
    if missing and strict:
        raise CheckpointMismatch(
            f"checkpoint {directory} has no {missing}; it holds {sorted(entries)}; "
            "pass strict=False to skip them"
        )
    restore = Restore(directory, manifest)
    tensors = read_tensors(listed(STATE_TENSORS))
    # Modules first: a changed model is a mismatch, whatever the order of the state's keys.
    keys = sorted(
        (k for k in state if k in entries), key=lambda k: not isinstance(state[k], nn.Module)
    )
    try:
        sharded = [k for k in keys if entries[k]["kind"] == "sharded"]
        if sharded:
            _prepare_sharded(restore, state, sharded, entries)
        for key in keys:
            if key not in sharded:
                _prepare_entry(restore, state, key, entries[key], tensors, listed, strict)
        for key, entry in entries.items():
            if entry["kind"] == "sharded":
                continue  # read only into live objects
            if key not in state:
                restore.rest[key] = (
                    read_tensors(listed(entry["file"]))
                    if entry["kind"] == "module"
                    else _tree.decode(entry["data"], tensors)
                )
        _prepare_rank(restore, manifest.world_size, listed, rank_state, rng)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RecursionError) as exc:
        if isinstance(exc, StokerError):
            raise
        raise CheckpointError(
            f"checkpoint {directory}: malformed state ({type(exc).__name__}: {exc})"
        ) from None
    return restore


def _prepare_sharded(
    restore: Restore, state: dict[str, Any], keys: list[str], entries: dict[str, Any]
) -> None:
    """A model and its optimizers written through DCP: the model's keys and shapes are
    checked now, everything is read at apply (each process its own slices, any world size)."""
    from stoker.checkpoint.sharded import check_sharded, load_sharded  # imports DCP

    directory = restore.directory
    models = [k for k in keys if entries[k].get("role") == "model"]
    if len(models) != 1 or not isinstance(state[models[0]], nn.Module):
        raise CheckpointMismatch(
            f"checkpoint {directory}: its sharded part holds the model {models} and optimizers; "
            f"{keys} must be that model and the optimizers in this state"
        )
    optimizers = [state[k] for k in keys if k not in models]
    if not all(isinstance(o, torch.optim.Optimizer) for o in optimizers):
        raise CheckpointMismatch(
            f"checkpoint {directory}: {keys[1:]} were saved as sharded optimizer state, but "
            "this state holds something else under those names"
        )
    others = [k for k, v in state.items() if isinstance(v, torch.optim.Optimizer)]
    if sorted(others) != sorted(k for k in keys if k not in models):
        raise CheckpointMismatch(
            f"checkpoint {directory}: the sharded optimizer state is for "
            f"{sorted(k for k in keys if k not in models)}; this state's optimizers are {others}"
        )
    model = unwrap_module(state[models[0]])
    root = directory / SHARDED_DIR
    try:
        check_sharded(root, model)
    except CheckpointMismatch as exc:
        raise CheckpointMismatch(f"checkpoint {directory}: {exc}") from None
    restore._then("the sharded model and optimizers", lambda: load_sharded(root, model, optimizers))


def _prepare_entry(
    restore: Restore,
    state: dict[str, Any],
    key: str,
    entry: dict[str, Any],
    tensors: Mapping[str, torch.Tensor],
    listed: Any,
    strict: bool,
) -> None:
    directory, kind, obj = restore.directory, entry["kind"], state[key]
    if isinstance(obj, nn.Module):
        if kind != "module":
            raise CheckpointMismatch(
                f"checkpoint {directory}: {key!r} was saved as {kind}, not a module"
            )
        weights: dict[str, Any] = dict(read_tensors(listed(entry["file"])))
        weights.update(_tree.decode(entry["extra"], tensors))
        _check_module(obj, weights, directory, key, strict)
        target = unwrap_module(obj)
        restore._then(repr(key), lambda: target.load_state_dict(weights, strict=False))
        return
    if kind == "module":
        data: Any = read_tensors(listed(entry["file"]))
    else:
        data = _tree.decode(entry["data"], tensors)
    if not is_stateful(obj):
        restore._then(repr(key), lambda: state.__setitem__(key, data))
        return
    if isinstance(obj, torch.optim.Optimizer):
        _check_optimizer(obj, data, directory, key)
    check = getattr(obj, "check_state_dict", None)
    if callable(check):
        try:
            check(data)
        except CheckpointError as exc:  # the object says what; say which checkpoint and key
            raise type(exc)(f"checkpoint {directory}: {key!r}: {exc}") from None
    restore._then(repr(key), lambda: obj.load_state_dict(data))


def _prepare_rank(
    restore: Restore,
    saved_world: int,
    listed: Any,
    rank_state: dict[str, Any] | None,
    rng: bool,
) -> None:
    rank = torch.distributed.get_rank() if _dist_on() else 0
    stem = rank_stem(rank)
    if rank >= saved_world:
        directory = restore.directory

        def keep_rng() -> None:
            warnings.warn(
                f"checkpoint {directory} was saved by {saved_world} processes; rank {rank} has "
                "no RNG state there and keeps its current one (resumed runs on a different "
                "number of processes are not bitwise exact)",
                CheckpointWarning,
                stacklevel=4,
            )

        restore._then("the RNG states", keep_rng)
        return
    tree = read_json(listed(f"{stem}.json"), limit=restore.manifest.files[f"{stem}.json"].bytes)
    per_rank = _tree.decode(tree, read_tensors(listed(f"{stem}.safetensors")))
    saved_rng, saved_state = per_rank.get("rng"), per_rank.get("rank_state")
    if rng and saved_rng is not None:
        check_rng(saved_rng)
        restore._then("the RNG states", lambda: restore_rng(saved_rng))
    if rank_state is not None and saved_state is not None:
        if not isinstance(saved_state, dict):
            raise TypeError(f"rank_state is a {type(saved_state).__name__}, not a dict")

        def put_rank_state() -> None:
            for key, obj in list(rank_state.items()):
                if key in saved_state:
                    if is_stateful(obj):
                        obj.load_state_dict(saved_state[key])
                    else:
                        rank_state[key] = saved_state[key]
            for key, value in saved_state.items():
                rank_state.setdefault(key, value)

        restore._then("the per-rank state", put_rank_state)


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
    read through ``json`` or ``safetensors``: loading a checkpoint never runs code. Everything
    is decoded and checked before any object is touched: module shapes, optimizer state
    against its parameters, RNG states, and whatever an object's own ``check_state_dict(state)``
    refuses (stoker's loaders check their position and batch size this way).
    """
    return prepare_load(
        directory,
        state,
        rank_state=rank_state,
        strict=strict,
        verify_checksums=verify_checksums,
        rng=rng,
    ).apply()


def _dist_on() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()
