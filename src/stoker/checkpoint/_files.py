"""Durable file writes that hash as they go, and a streaming safetensors writer.

Why our own safetensors *writer* (reading always goes through the official ``safetensors``
parser): writing the bytes ourselves lets one pass feed both ``sha256`` and ``write(2)`` from a
zero-copy view of each tensor, and both release the GIL, so a background save leaves the
training loop's thread free. The format (https://github.com/huggingface/safetensors#format) is
8 bytes little-endian header length N, N bytes of JSON header (padded with spaces to a multiple
of 8), then the tensors' bytes back to back, as the header's ``data_offsets`` say.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import struct
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

__all__ = ["CHUNK", "fsync_dir", "sha256_file", "write_bytes", "write_safetensors"]

CHUNK = 16 << 20  # bytes per write/hash call: large enough to amortise, small enough to stream

# torch dtype -> safetensors dtype string (the names of the format's spec).
_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.complex64: "C64",
}
for _name, _code in (
    ("uint16", "U16"),
    ("uint32", "U32"),
    ("uint64", "U64"),
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e5m2", "F8_E5M2"),
):
    _dt = getattr(torch, _name, None)
    if isinstance(_dt, torch.dtype):
        _DTYPES[_dt] = _code


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (new files, renames) durable. No-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(path: Path, data: bytes) -> tuple[str, int]:
    """Write ``data`` to ``path``, fsync it; returns ``(sha256 hex, size in bytes)``."""
    with open(path, "wb", buffering=0) as f:
        view = memoryview(data)
        while view:
            n = f.write(view)
            view = view[n:]
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest(), len(data)


def sha256_file(path: Path) -> tuple[str, int]:
    """``(sha256 hex, size in bytes)`` of a file, read in :data:`CHUNK` pieces."""
    digest = hashlib.sha256()
    size = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
            size += n
    return digest.hexdigest(), size


def _as_bytes(t: torch.Tensor) -> memoryview:
    # (numel,) of the tensor's dtype -> (numel * itemsize,) uint8, sharing memory when possible.
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())  # type: ignore[arg-type]


def write_safetensors(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> tuple[str, int]:
    """Write ``tensors`` as a safetensors file, hashing while writing; fsyncs it.

    Tensors must not share memory with each other (the caller deduplicates); non-contiguous or
    non-CPU tensors are copied. Returns ``(sha256 hex, size in bytes)``.
    """
    # Largest itemsize first keeps every tensor's offset aligned to its itemsize, given the
    # 8-byte-aligned header (the official writer orders them the same way).
    names = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict[str, object] = {}
    offset = 0
    for name in names:
        t = tensors[name]
        code = _DTYPES.get(t.dtype)
        if code is None:
            raise TypeError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": code,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    if metadata:
        header["__metadata__"] = dict(metadata)
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    digest = hashlib.sha256()
    size = 0
    # Hash on a helper thread while this one writes the same chunk: both release the GIL, so
    # on 2+ cores a file costs max(hash, write) instead of their sum. One worker keeps the
    # updates in order; a chunk's hash is waited for before the chunk two steps later is
    # queued, bounding the lag (the views are zero-copy, nothing is buffered).
    with open(path, "wb", buffering=0) as f, ThreadPoolExecutor(1, "stoker-sha256") as hasher:
        pending: collections.deque[Future[None]] = collections.deque()

        def put(data: memoryview | bytes) -> None:
            nonlocal size
            view = memoryview(data)
            for start in range(0, len(view), CHUNK):
                piece = view[start : start + CHUNK]
                pending.append(hasher.submit(digest.update, piece))
                while piece:
                    n = f.write(piece)
                    piece = piece[n:]
                while len(pending) > 2:
                    pending.popleft().result()
            size += len(view)

        put(struct.pack("<Q", len(head)) + head)
        for name in names:
            put(_as_bytes(tensors[name]))
        while pending:
            pending.popleft().result()
        os.fsync(f.fileno())
    return digest.hexdigest(), size
