"""The file format of a stored segment (``kvshare.store.disk``), written and read safely.

File: a plain safetensors file (any safetensors reader opens it): tensors ``keys`` then
``values``, each [L, H, S, D] in the segment's dtype, and two ``__metadata__`` strings:
``kvshare``, a JSON object (storage format, KV identity digest, scope, content_hash, tokens,
kind, role, agent, source_start, slot, bounds, dtype, shape), and ``hmac``, the store's seal
(``kvshare.store.seal``) of that JSON text's UTF-8 bytes followed by the bytes of ``keys`` and of
``values``. An edit by anyone without the store's secret (another tenant in ``scope``, another
model's KV, re-checksummed or not) fails the seal.

Reading never trusts the path: a file is opened read-only without following a symlink and
without blocking (a FIFO), and must be a regular file (:class:`NotRegularError` otherwise);
the header is parsed by this module (size-capped, exactly the layout :func:`file_chunks`
writes), and the tensors are views of a private mapping of the opened descriptor (no copy;
valid after the file is deleted or replaced).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import stat
import struct
from collections.abc import Hashable
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from kvshare.errors import ConfigError, ScopeError, StateFileError
from kvshare.kernels import KV
from kvshare.scope import Scope, check_id
from kvshare.store.contract import StoredSegment, StoreKey
from kvshare.store.identity import STORAGE_FORMAT
from kvshare.store.seal import Sealer

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_CODES = {dtype: code for code, dtype in DTYPES.items()}
_STRICT = ConfigDict(strict=True, extra="forbid", frozen=True)
MAX_HEADER = 64 << 20  # bytes of header JSON a reader accepts (ours: ~600 + ~6 per token)


class NotRegularError(StateFileError):
    """A path where a segment file should be holds no regular file (a directory, a FIFO, a
    socket, a device or a symlink): skipped, never opened for reading, never deleted."""


class _ScopeJSON(BaseModel):
    model_config = _STRICT

    kind: str
    tenant: str | None
    session: str | None
    anonymous: bool


class Meta(BaseModel):
    """The ``kvshare`` metadata of a segment file (a plain str scope stays a str)."""

    model_config = _STRICT

    version: int
    model: str
    scope: _ScopeJSON | str
    content_hash: str
    tokens: tuple[int, ...]
    kind: str
    role: str
    agent: str | None
    source_start: int
    slot: str
    bounds: tuple[tuple[int, str], ...]
    dtype: str
    shape: tuple[int, int, int, int]

    def key(self) -> StoreKey:
        return (scope_of(self.scope), self.content_hash)

    def nbytes(self) -> int:
        return 2 * torch.Size(self.shape).numel() * DTYPES[self.dtype].itemsize


def scope_json(scope: Hashable) -> dict[str, Any] | str:
    """The JSON form of ``scope``: a :class:`Scope`'s fields or a plain str (else ScopeError)."""
    if isinstance(scope, str):
        return "" + scope
    if type(scope) is Scope and isinstance(scope.kind, str) and isinstance(scope.anonymous, bool):
        tenant, session = check_id("tenant", scope.tenant), check_id("session", scope.session)
        return {"kind": "" + scope.kind, "tenant": tenant, "session": session,
                "anonymous": scope.anonymous}  # fmt: skip
    raise ScopeError(
        f"the disk tier stores a Scope (str kind, str or None ids, bool anonymous) or a str, "
        f"got {type(scope).__name__} {scope!r}; nothing was written"
    )


def scope_of(data: _ScopeJSON | str) -> Hashable:
    """The scope a file's metadata names (inverse of :func:`scope_json`)."""
    if isinstance(data, str):
        return data
    return Scope(data.kind, data.tenant, data.session, data.anonymous)


def file_name(scope: Hashable, content_hash: str) -> str:
    """The file name of the segment (scope, content_hash): a hash, never the raw ids."""
    blob = json.dumps([scope_json(scope), content_hash], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest() + ".safetensors"


def meta_text(segment: StoredSegment, model: str) -> str:
    """``segment``'s metadata as JSON, checked to read back (ConfigError / ScopeError: nothing
    written)."""
    kv = segment.kv
    data = {
        "version": STORAGE_FORMAT, "model": model, "scope": scope_json(segment.scope),
        "content_hash": segment.content_hash, "tokens": [int(t) for t in segment.tokens],
        "kind": segment.kind, "role": segment.role, "agent": segment.agent,
        "source_start": segment.source_start, "slot": segment.slot,
        "bounds": [list(b) for b in segment.bounds], "dtype": _CODES.get(kv.keys.dtype),
        "shape": list(kv.keys.shape),
    }  # fmt: skip
    try:
        text = json.dumps(data, separators=(",", ":"))
        text.encode("utf-8")  # ids were checked at the boundary; content hashes too
        if data["dtype"] is None or kv.values.dtype != kv.keys.dtype:
            raise ValueError(f"KV dtype {kv.keys.dtype} (supported: {list(_CODES)})")
        Meta.model_validate_json(text)
    except (TypeError, ValueError) as exc:  # ValidationError and UnicodeError are ValueErrors
        raise ConfigError(
            f"segment {segment.content_hash!r} cannot be stored on disk: {exc}; nothing was written"
        ) from exc
    return text


def _raw(t: Tensor) -> memoryview:
    """The bytes of ``t`` on the host (no copy for a contiguous CPU tensor)."""
    flat = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return flat.numpy().data


def file_chunks(kv: KV, text: str, sealer: Sealer) -> list[memoryview]:
    """The bytes of a segment file: safetensors header (8-byte length, JSON padded with spaces
    to 8 bytes so the tensors are aligned), ``keys`` at [0, n), ``values`` at [n, 2n)."""
    keys, values = _raw(kv.keys), _raw(kv.values)
    head = _layout(_CODES[kv.keys.dtype], list(kv.keys.shape), keys.nbytes)
    head["__metadata__"] = {"kvshare": text, "hmac": sealer.seal([text.encode(), keys, values])}
    raw = json.dumps(head, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return [memoryview(struct.pack("<Q", len(raw)) + raw), keys, values]


def _layout(dtype: str, shape: list[int], n: int) -> dict[str, Any]:
    spans = {"keys": [0, n], "values": [n, 2 * n]}
    return {name: {"dtype": dtype, "shape": shape, "data_offsets": s} for name, s in spans.items()}


def open_regular(path: os.PathLike[str] | str) -> tuple[int, int]:
    """(descriptor, size) of ``path`` opened read-only, not through a symlink, not blocking.
    NotRegularError when it is no regular file; OSError when it cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if os.path.islink(path):
            raise NotRegularError(f"{path}: a symlink") from exc
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise NotRegularError(f"{path}: not a regular file (mode {info.st_mode:o})")
    return fd, info.st_size


def _pread(fd: int, n: int, at: int, where: object) -> bytes:
    data = os.pread(fd, n, at)
    if len(data) != n:
        raise StateFileError(f"{where}: truncated")
    return data


def read_meta(fd: int, size: int, where: object) -> tuple[Meta, str, str, int]:
    """(metadata, its text, the seal, where the tensor bytes start) from the header of an open
    segment file; StateFileError for anything but the layout :func:`file_chunks` writes."""
    return _parse_meta(lambda n, at: _pread(fd, n, at, where), size, where)


def _parse_meta(read: Any, size: int, where: object) -> tuple[Meta, str, str, int]:
    """:func:`read_meta` over ``read(n, at)`` (exactly n bytes at offset ``at``, else
    StateFileError) of a segment of ``size`` bytes."""
    (n,) = struct.unpack("<Q", read(8, 0))
    if n > min(MAX_HEADER, size - 8):
        raise StateFileError(f"{where}: header of {n} bytes")
    try:
        head = json.loads(read(n, 8))
        stored = head.pop("__metadata__")
        text, seal = stored["kvshare"], stored["hmac"]
        meta = Meta.model_validate_json(text)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StateFileError(f"{where}: invalid kvshare metadata ({exc})") from exc
    if meta.dtype not in DTYPES:
        raise StateFileError(f"{where}: dtype {meta.dtype!r}")
    half = meta.nbytes() // 2
    if head != _layout(meta.dtype, list(meta.shape), half) or size != 8 + n + 2 * half:
        raise StateFileError(f"{where}: tensors differ from the metadata")
    return meta, text, seal, 8 + n


def load(fd: int, size: int, sealer: Sealer, where: object) -> tuple[Meta, KV]:
    """The sealed segment file open on ``fd``: its metadata and KV [L, H, S, D] as views of a
    private mapping (StateFileError when its seal or layout is wrong)."""
    meta, text, seal, start = read_meta(fd, size, where)
    mapped = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
    return meta, _sealed_kv(mapped, meta, text, seal, start, sealer, where)


def loads(data: bytes, sealer: Sealer, where: object) -> tuple[Meta, KV]:
    """:func:`load` of a segment held in memory (the bytes :func:`file_chunks` joined, as a
    shared tier stores them); KV [L, H, S, D] over a private copy of ``data``."""

    def read(n: int, at: int) -> bytes:
        if at + n > len(data):
            raise StateFileError(f"{where}: truncated")
        return data[at : at + n]

    meta, text, seal, start = _parse_meta(read, len(data), where)
    return meta, _sealed_kv(bytearray(data), meta, text, seal, start, sealer, where)


def _sealed_kv(
    buffer: Any, meta: Meta, text: str, seal: str, start: int, sealer: Sealer, where: object
) -> KV:
    """The KV in ``buffer`` (a writable buffer of the whole segment) once its seal checks."""
    half = meta.nbytes() // 2
    data = memoryview(buffer)
    parts: list[bytes | memoryview] = [text.encode(), data[start : start + half]]
    parts.append(data[start + half : start + 2 * half])
    if not sealer.check(seal, parts):
        raise StateFileError(f"{where}: the seal does not match (edited, or another store's)")
    dtype, count = DTYPES[meta.dtype], half // DTYPES[meta.dtype].itemsize
    keys, values = (
        torch.frombuffer(buffer, dtype=dtype, count=count, offset=at).view(meta.shape)
        for at in (start, start + half)
    )
    return KV(keys, values)
