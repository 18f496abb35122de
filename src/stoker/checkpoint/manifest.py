"""The manifest: the last file written into a checkpoint, and the proof it is complete.

``manifest.json`` lists every file of the checkpoint with its size and SHA-256. A directory
without one was never finished; a file whose size or hash differs was truncated or corrupted.
Only files the manifest lists are ever read, and only as JSON or through the safetensors
parser (the ``kind`` field), so a stray or planted file — a pickle, say — is never opened.
Every file, the manifest first, is opened through :mod:`stoker.safe_files`: a FIFO, a device,
a symlink or a checkpoint directory resolving outside ``root`` is refused, never read.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stoker import safe_files
from stoker.checkpoint._files import CHUNK, write_bytes
from stoker.checkpoint.errors import CheckpointError

__all__ = ["FORMAT", "MANIFEST", "VERSION", "FileEntry", "Manifest", "read_manifest", "verify"]

FORMAT = "stoker-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
KINDS = ("json", "safetensors")
MANIFEST_LIMIT = 16 << 20  # bytes; a manifest lists a few files per rank (~150 bytes each)
# File names are tame: at most two directory levels (a sharded checkpoint's ``sharded/model/``
# shards), each part starting with a letter, digit or underscore: no "..", no hidden files, no
# absolute paths.
_PART = r"[A-Za-z0-9_][A-Za-z0-9_.\-]*"
_FILE_NAME = re.compile(rf"{_PART}(?:/{_PART}){{0,2}}")


@dataclass(frozen=True, slots=True)
class FileEntry:
    sha256: str
    bytes: int
    kind: str


@dataclass(frozen=True, slots=True)
class Manifest:
    """What ``manifest.json`` says about a checkpoint."""

    step: int | None
    world_size: int
    created: str
    files: dict[str, FileEntry] = field(default_factory=dict)

    def to_json(self) -> bytes:
        files = {
            name: {"sha256": e.sha256, "bytes": e.bytes, "kind": e.kind}
            for name, e in sorted(self.files.items())
        }
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "step": self.step,
            "world_size": self.world_size,
            "created": self.created,
            "files": files,
        }
        return (json.dumps(doc, indent=1) + "\n").encode("utf-8")

    def write(self, directory: Path) -> None:
        write_bytes(directory / MANIFEST, self.to_json())

    @staticmethod
    def now() -> str:
        return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def read_manifest(directory: Path, *, root: Path | None = None) -> Manifest:
    """Parse ``directory/manifest.json``; raises :class:`CheckpointError` if absent or malformed.

    ``root``: the directory ``directory`` must resolve inside (default: itself), so a
    ``step-N`` symlink out of the checkpoints directory is refused.
    """
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise CheckpointError(
            f"{directory} is not a checkpoint directory (stoker checkpoints are directories "
            "such as step-000100/ holding a manifest.json); pass the directory"
        )
    if root is not None and not directory.resolve().is_relative_to(Path(root).resolve()):
        raise CheckpointError(
            f"checkpoint {directory} resolves to {directory.resolve()}, outside {root} (a "
            "symlink out of the checkpoints directory); it was not read"
        )
    try:
        doc: Any = safe_files.read_json(
            path, expect=object, limit=MANIFEST_LIMIT, error=CheckpointError
        )
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint {directory} has no {MANIFEST}: it was never completed (the save was "
            "interrupted); use an older checkpoint"
        ) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} manifest; it is not a stoker checkpoint")
    if doc.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint {directory} has format version {doc.get('version')!r}; this stoker reads "
            f"version {VERSION}; load it with the stoker release that wrote it"
        )
    files: dict[str, FileEntry] = {}
    try:
        for name, entry in doc["files"].items():
            if not _FILE_NAME.fullmatch(name) or name == MANIFEST:
                raise CheckpointError(
                    f"checkpoint {directory}: manifest lists bad file name {name!r}"
                )
            if entry["kind"] not in KINDS:
                raise CheckpointError(
                    f"checkpoint {directory}: manifest lists {name!r} of kind {entry['kind']!r}; "
                    f"stoker only reads {KINDS} (never pickle)"
                )
            if not _count(entry["bytes"], 0):
                raise CheckpointError(
                    f"checkpoint {directory}: manifest gives {name!r} {entry['bytes']!r} bytes"
                )
            files[name] = FileEntry(str(entry["sha256"]), entry["bytes"], str(entry["kind"]))
        step, world_size = doc["step"], doc["world_size"]
        if not (step is None or _count(step, 0)) or not _count(world_size, 1):
            raise CheckpointError(
                f"checkpoint {directory}: manifest gives step={step!r}, world_size="
                f"{world_size!r}; a stoker manifest has a step >= 0 and a world_size >= 1"
            )
        return Manifest(step=step, world_size=world_size, created=str(doc["created"]), files=files)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"checkpoint {directory}: malformed {MANIFEST} ({exc!r})") from None


def _count(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def verify(directory: str | Path, *, root: Path | None = None) -> Manifest:
    """Check every file the manifest lists: a regular file, right size, right SHA-256.

    Returns the manifest; raises :class:`CheckpointError` naming the first bad file. ``root``
    as for :func:`read_manifest`.
    """
    directory = Path(directory)
    manifest = read_manifest(directory, root=root)
    # Files are hashed in parallel (hashlib releases the GIL): SHA-256 is the slow part of a
    # load, ~1.2 GB/s per core here.
    names = sorted(manifest.files, key=lambda n: -manifest.files[n].bytes)
    workers = max(1, min(len(names), os.cpu_count() or 1, 4))

    def digest_of(name: str) -> str | CheckpointError:
        try:
            return _digest(directory, name, manifest.files[name].bytes)
        except CheckpointError as exc:
            return exc

    with ThreadPoolExecutor(workers, "stoker-verify") as pool:
        digests = dict(zip(names, pool.map(digest_of, names), strict=True))
    for name, entry in sorted(manifest.files.items()):
        digest = digests[name]
        if isinstance(digest, CheckpointError):
            raise digest
        if digest != entry.sha256:
            raise CheckpointError(
                f"checkpoint {directory}: {name} fails its SHA-256 check (corrupted: "
                f"{digest[:12]}… != {entry.sha256[:12]}…)"
            )
    return manifest


def _digest(directory: Path, name: str, expected: int) -> str:
    """SHA-256 of ``directory/name``, a regular file of exactly ``expected`` bytes."""
    path = directory / name
    try:
        # root: a subdirectory that is a symlink out of the checkpoint is refused.
        f = safe_files.open_regular(path, limit=None, error=CheckpointError, root=directory)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {directory}: {name} is missing") from None
    digest = hashlib.sha256()
    with f:
        size = os.fstat(f.fileno()).st_size
        if size != expected:
            raise CheckpointError(
                f"checkpoint {directory}: {name} has {size} bytes, the manifest says "
                f"{expected} (truncated or overwritten)"
            )
        buf = bytearray(min(CHUNK, max(expected, 1)))
        view = memoryview(buf)
        read = 0
        while read <= expected and (n := f.readinto(buf)):
            digest.update(view[:n])
            read += n
    if read != expected:
        raise CheckpointError(f"checkpoint {directory}: {name} changed while being read")
    return digest.hexdigest()
