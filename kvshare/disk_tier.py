"""Disk tier: stored segments as safetensors files that survive a restart.

Layout: ``directory/<model digest>/<sha256 of (scope, content_hash)>.safetensors``. The model
digest hashes the :class:`ModelIdentity`, so two models never see each other's files; file
names never carry raw ids.

File: a plain safetensors file (any safetensors reader opens it): tensors ``keys`` then
``values``, each [L, H, S, D] in the segment's dtype, and two ``__metadata__`` strings:
``kvshare``, a JSON object (format version, model digest, scope, content_hash, tokens, kind,
role, agent, source_start, slot, bounds, dtype, shape), and ``sha256``, the digest of that
JSON text's UTF-8 bytes followed by the bytes of ``keys`` and of ``values``.

Bytes: ``bytes_used`` counts tensor bytes (``StoredSegment.nbytes``, the unit every tier and
the stack budget in), not file sizes: a file adds a header of ~600 bytes plus ~6 per token.

Crash safety: a file is written under a temporary name ``.<pid>.<random>.tmp`` (never a
segment name, so never indexed), fsynced, renamed to its final name with ``os.replace``
(atomic), then the directory is fsynced. A crash leaves no file or a complete one under the
final name (after a power loss a removed file may come back: still a valid segment); opening
a tier deletes temporaries whose writer process is gone. Whatever still goes wrong (bit rot,
truncation, a foreign file) fails the checksum or the header checks: the file is deleted,
counted in ``corrupt`` and the lookup misses; nothing raises.

Loading maps the file (``safetensors.safe_open``: a private mmap, no copy): the tensors
``get`` returns are views of that mapping, which stays valid after ``remove`` deletes the file
(POSIX keeps an unlinked file's pages while mapped; this tier only ever replaces or deletes
files, never rewrites one in place). Its disk space is freed when the last view is.
One live tier per (directory, identity) at a time; a later one (a restart) finds its files.

Write-behind (``write_behind`` > 0 bytes): ``put`` reserves the bytes and hands the segment to
a writer thread, so a demotion costs its caller nothing; until its file is committed the
segment is served from memory (``get``), a ``remove`` cancels it, and its memory stays held
(at most ``write_behind`` bytes; beyond that ``put`` writes in the caller, as with 0). A write
that fails is counted in ``write_errors`` and the segment is gone (a later lookup misses).
``flush`` waits for the writes in flight; opening a tier on a directory first flushes the
live tiers of this process there, and so does the interpreter's exit.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import json
import os
import re
import struct
import tempfile
import threading
import weakref
from collections.abc import Hashable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors import safe_open
from torch import Tensor

from kvshare.anchors.persist import ModelIdentity, _fsync_dir
from kvshare.errors import CacheDirError, ConfigError, ScopeError, StateFileError
from kvshare.kernels import KV
from kvshare.scope import Scope, check_id
from kvshare.store import StoredSegment, StoreKey
from kvshare.tiers import KVTier

FORMAT_VERSION = 1
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_CODES = {dtype: code for code, dtype in DTYPES.items()}
_SEGMENT = re.compile(r"[0-9a-f]{64}\.safetensors")
_TEMP = re.compile(r"\.(\d+)\..+\.tmp")  # .<writer pid>.<random>.tmp
_STRICT = ConfigDict(strict=True, extra="forbid", frozen=True)
_LIVE: weakref.WeakSet[DiskTier] = weakref.WeakSet()  # tiers that may have writes in flight


@atexit.register
def _flush_live() -> None:
    for tier in list(_LIVE):
        tier.flush()


class _ScopeJSON(BaseModel):
    model_config = _STRICT

    kind: str
    tenant: str | None
    session: str | None
    anonymous: bool


class _Meta(BaseModel):
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


@dataclass(frozen=True, eq=False)
class _Entry:
    """An indexed file and the tensor bytes it holds (compared by identity)."""

    path: Path
    nbytes: int


def model_digest(identity: ModelIdentity) -> str:
    """The name of ``identity``'s directory: 32 hex digits of a hash of its fields."""
    blob = json.dumps(dataclasses.asdict(identity), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _scope_json(scope: Hashable) -> dict[str, Any] | str:
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


def _scope_of(data: _ScopeJSON | str) -> Hashable:
    """The scope a file's metadata names (inverse of :func:`_scope_json`)."""
    if isinstance(data, str):
        return data
    return Scope(data.kind, data.tenant, data.session, data.anonymous)


def file_name(scope: Hashable, content_hash: str) -> str:
    """The file name of the segment (scope, content_hash): a hash, never the raw ids."""
    blob = json.dumps([_scope_json(scope), content_hash], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest() + ".safetensors"


def _meta_text(segment: StoredSegment, model: str) -> str:
    """``segment``'s metadata as JSON, checked to read back (ConfigError: nothing written)."""
    kv = segment.kv
    data = {
        "version": FORMAT_VERSION, "model": model, "scope": _scope_json(segment.scope),
        "content_hash": segment.content_hash, "tokens": [int(t) for t in segment.tokens],
        "kind": segment.kind, "role": segment.role, "agent": segment.agent,
        "source_start": segment.source_start, "slot": segment.slot,
        "bounds": [list(b) for b in segment.bounds], "dtype": _CODES.get(kv.keys.dtype),
        "shape": list(kv.keys.shape),
    }  # fmt: skip
    try:
        text = json.dumps(data, separators=(",", ":"))
        if data["dtype"] is None or kv.values.dtype != kv.keys.dtype:
            raise ValueError(f"KV dtype {kv.keys.dtype} (supported: {list(_CODES)})")
        _Meta.model_validate_json(text)
    except (TypeError, ValueError) as exc:  # ValidationError is a ValueError
        raise ConfigError(
            f"segment {segment.content_hash!r} cannot be stored on disk: {exc}; nothing was written"
        ) from exc
    return text


def _raw(t: Tensor) -> memoryview:
    """The bytes of ``t`` on the host (no copy for a contiguous CPU tensor)."""
    flat = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return flat.numpy().data


def _checksum(text: str, *parts: memoryview) -> str:
    digest = hashlib.sha256(text.encode())
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


def _chunks(kv: KV, text: str) -> list[memoryview]:
    """The bytes of a segment file: safetensors header (8-byte length, JSON padded with spaces
    to 8 bytes so the tensors are aligned), ``keys`` at [0, n), ``values`` at [n, 2n)."""
    keys, values = _raw(kv.keys), _raw(kv.values)
    n, dtype, shape = keys.nbytes, _CODES[kv.keys.dtype], list(kv.keys.shape)
    spans = {"keys": [0, n], "values": [n, 2 * n]}
    head: dict[str, Any] = {
        name: {"dtype": dtype, "shape": shape, "data_offsets": span} for name, span in spans.items()
    }
    head["__metadata__"] = {"kvshare": text, "sha256": _checksum(text, keys, values)}
    raw = json.dumps(head, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return [memoryview(struct.pack("<Q", len(raw)) + raw), keys, values]


def _write_temp(directory: Path, chunks: list[memoryview]) -> Path:
    """``chunks`` in a new fsynced temporary file in ``directory``; on failure none is left."""
    fd, name = tempfile.mkstemp(dir=directory, prefix=f".{os.getpid()}.", suffix=".tmp")
    try:
        try:
            for chunk in chunks:
                while chunk:
                    chunk = chunk[os.write(fd, chunk) :]
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (a temporary file of a live writer is left alone)."""
    try:
        os.kill(pid, 0)  # signal 0: only checks that it exists
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # it exists, under another user
        pass
    return True


def _read_meta(stored: dict[str, str] | None, where: Path) -> tuple[str, str, _Meta]:
    """The metadata text, its checksum and the parsed metadata (StateFileError if unusable)."""
    try:
        text, digest = (stored or {})["kvshare"], (stored or {})["sha256"]
        return text, digest, _Meta.model_validate_json(text)
    except (KeyError, ValidationError) as exc:
        raise StateFileError(f"{where}: invalid kvshare metadata ({exc})") from exc


class DiskTier(KVTier):
    """Segments as files under ``directory/<model digest>/`` (format: the module docstring).

    budget_bytes: tensor bytes it may hold. identity: the model the KV belongs to.
    corrupt: files found unusable and deleted; dropped: files deleted at open because they
    were beyond the budget (the newest are kept); write_errors: puts refused (or, written
    behind, lost) for an OSError. write_behind: bytes of puts that may wait for a writer
    thread (0: every put writes before it returns; module docstring).
    Raises CacheDirError when the directory cannot be created, ConfigError for a bad budget.
    """

    name = "disk"

    def __init__(
        self,
        directory: str | Path,
        budget_bytes: int,
        identity: ModelIdentity,
        write_behind: int = 0,
    ) -> None:
        for what, value in (("budget_bytes", budget_bytes), ("write_behind", write_behind)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{what} must be an int >= 0, got {value!r}")
        self.write_behind = write_behind
        self.budget_bytes, self.model = budget_bytes, model_digest(identity)
        self.path = Path(directory) / self.model
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheDirError(f"cannot create the disk tier at {self.path}: {exc}") from exc
        self.corrupt = self.dropped = self.write_errors = 0
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)  # a write behind finished
        self._index: dict[StoreKey, _Entry] = {}
        self._pending: dict[StoreKey, tuple[StoredSegment, Path, str]] = {}
        self._pending_bytes = 0
        self._writer: threading.Thread | None = None
        self._bytes = 0
        for tier in list(_LIVE):
            if tier.path == self.path:
                tier.flush()
        self._open()
        _LIVE.add(self)

    def _open(self) -> None:
        """Delete stale temporaries, then index this model's files, newest first, while they
        fit the budget; unreadable ones are deleted (corrupt), the rest too (dropped)."""
        found = []
        for path in self.path.iterdir():
            temp = _TEMP.fullmatch(path.name)
            if temp and not _alive(int(temp.group(1))):
                path.unlink(missing_ok=True)
            elif _SEGMENT.fullmatch(path.name):
                with suppress(OSError):
                    found.append((path.stat().st_mtime_ns, path))
        for _, path in sorted(found, reverse=True):
            try:
                key, nbytes = self._header(path)
            except Exception:  # any failure to parse a header: a corrupt file
                self.corrupt += 1
                path.unlink(missing_ok=True)
                continue
            if self._bytes + nbytes > self.budget_bytes:
                self.dropped += 1
                path.unlink(missing_ok=True)
                continue
            self._index[key] = _Entry(path, nbytes)
            self._bytes += nbytes

    def _check(self, meta: _Meta, path: Path) -> StoreKey:
        """The key ``path`` holds, after checking its version, model and name."""
        key = (_scope_of(meta.scope), meta.content_hash)
        if (meta.version, meta.model) != (FORMAT_VERSION, self.model) or meta.dtype not in DTYPES:
            raise StateFileError(f"{path}: another format version, model or dtype")
        if file_name(*key) != path.name:
            raise StateFileError(f"{path}: its name is not the hash of its key")
        return key

    def _header(self, path: Path) -> tuple[StoreKey, int]:
        """The key of ``path`` and its tensor bytes, from its header alone."""
        with safe_open(str(path), framework="pt") as f:
            _, _, meta = _read_meta(f.metadata(), path)
        key = self._check(meta, path)
        return key, 2 * torch.Size(meta.shape).numel() * DTYPES[meta.dtype].itemsize

    def _load(self, path: Path, key: StoreKey) -> StoredSegment:
        """The verified segment in ``path``: KV [L, H, S, D] mapped from the file (raises
        StateFileError, OSError or a safetensors error when the file is unusable)."""
        with safe_open(str(path), framework="pt") as f:
            text, digest, meta = _read_meta(f.metadata(), path)
            kv = KV(f.get_tensor("keys"), f.get_tensor("values"))
        found = self._check(meta, path)
        if found != key:
            raise StateFileError(f"{path}: holds another key")
        if {kv.keys.dtype, kv.values.dtype} != {DTYPES[meta.dtype]} or kv.keys.shape != meta.shape:
            raise StateFileError(f"{path}: tensors differ from the metadata")
        if _checksum(text, _raw(kv.keys), _raw(kv.values)) != digest:
            raise StateFileError(f"{path}: checksum mismatch")
        return StoredSegment(
            found[0], meta.content_hash, meta.tokens, kv, meta.kind, meta.role, meta.agent,
            meta.source_start, meta.slot, meta.bounds,
        )  # fmt: skip

    def put(self, segment: StoredSegment) -> bool:
        path = self.path / file_name(segment.scope, segment.content_hash)  # may raise ScopeError
        text, key, nbytes = _meta_text(segment, self.model), segment.key, segment.nbytes
        with self._lock:
            if key in self._index or key in self._pending:
                return True
            if self._bytes + nbytes > self.budget_bytes:
                return False
            self._bytes += nbytes  # reserved first: concurrent puts never overshoot
            if self._pending_bytes + nbytes <= self.write_behind:
                self._pending[key] = (segment, path, text)
                self._pending_bytes += nbytes
                if self._writer is None:
                    self._writer = threading.Thread(target=self._drain, daemon=True)
                    self._writer.start()
                return True
        return self._write(key, segment, path, text)

    def _write(self, key: StoreKey, segment: StoredSegment, path: Path, text: str) -> bool:
        """Write and commit ``segment``'s file in this thread (the bytes are reserved)."""
        nbytes = segment.nbytes
        try:
            temp = _write_temp(self.path, _chunks(segment.kv, text))
            self._commit(key, _Entry(path, nbytes), temp)
        except OSError:  # no space, no permission: the segment does not fit
            self._release(nbytes, error=True)
            return False
        except BaseException:
            self._release(nbytes)
            raise
        _fsync_dir(self.path)
        return True

    def _drain(self) -> None:
        """The writer thread: commit pending segments, oldest first, until none is left."""
        while True:
            with self._lock:
                if not self._pending:
                    self._writer = None
                    return
                key, item = next(iter(self._pending.items()))
            segment, path, text = item
            try:
                temp: Path | None = _write_temp(self.path, _chunks(segment.kv, text))
            except Exception:  # no space, no permission: the segment is lost (counted)
                temp = None
            with self._lock:
                if self._pending.get(key) is item:  # not removed (or replaced) meanwhile
                    del self._pending[key]
                    self._pending_bytes -= segment.nbytes
                    with suppress(OSError):
                        if temp is not None:
                            os.replace(temp, path)
                            self._index[key], temp = _Entry(path, segment.nbytes), None
                    if key not in self._index:
                        self._bytes -= segment.nbytes
                        self.write_errors += 1
                self._done.notify_all()
            if temp is not None:
                temp.unlink(missing_ok=True)
            with suppress(OSError):
                _fsync_dir(self.path)

    def flush(self) -> None:
        """Wait until every put written behind is committed (or failed)."""
        with self._lock:
            while self._pending:
                self._done.wait()

    def _commit(self, key: StoreKey, entry: _Entry, temp: Path) -> None:
        """Rename ``temp`` to ``entry.path`` and index it, under the lock (so a remove of the
        same key never deletes a newer file); if another put stored ``key`` first, drop it."""
        with self._lock:
            try:
                if key not in self._index:
                    os.replace(temp, entry.path)
                    self._index[key] = entry
                    return
            except BaseException:
                temp.unlink(missing_ok=True)
                raise
            self._bytes -= entry.nbytes
        temp.unlink()

    def _release(self, nbytes: int, error: bool = False) -> None:
        """Give back the bytes a failed put reserved (``error``: it failed for an OSError)."""
        with self._lock:
            self._bytes -= nbytes
            self.write_errors += error

    def get(self, key: StoreKey, tokens: Sequence[int]) -> StoredSegment | None:
        with self._lock:
            entry, pending = self._index.get(key), self._pending.get(key)
        if pending is not None:  # still in memory, being written behind
            return pending[0] if pending[0].tokens == tuple(tokens) else None
        if entry is None:
            return None
        try:
            segment = self._load(entry.path, key)
        except Exception:  # any failure to read or verify the file: a miss, never an error
            self._discard(key, entry)
            return None
        return segment if segment.tokens == tuple(tokens) else None

    def _discard(self, key: StoreKey, entry: _Entry) -> None:
        """Delete a corrupt file, unless a remove or put changed ``key`` since it was read."""
        with self._lock:
            if self._index.get(key) is entry:
                self._remove_locked(key)
                self.corrupt += 1

    def _remove_locked(self, key: StoreKey) -> int:
        """:meth:`remove` for a caller that holds the lock (a pending write is cancelled)."""
        pending = self._pending.pop(key, None)
        if pending is not None:
            nbytes = pending[0].nbytes
            self._pending_bytes -= nbytes
            self._bytes -= nbytes
            self._done.notify_all()
            return nbytes
        entry = self._index.pop(key, None)
        if entry is None:
            return 0
        self._bytes -= entry.nbytes
        with suppress(OSError):  # one that cannot be deleted is found again at the next open
            entry.path.unlink(missing_ok=True)
        return entry.nbytes

    def remove(self, key: StoreKey) -> int:
        with self._lock:
            return self._remove_locked(key)

    def keys(self) -> list[StoreKey]:
        with self._lock:
            return [*self._index, *self._pending]

    def listing(self) -> list[tuple[StoreKey, tuple[int, ...], int]]:
        """Read from the files' headers (no tensor data); unreadable files are left to the
        next ``get`` (which drops them as corrupt)."""
        with self._lock:
            entries = list(self._index.items())
            out = [(k, p[0].tokens, p[0].nbytes) for k, p in self._pending.items()]
        for key, entry in entries:
            with suppress(Exception):
                with safe_open(str(entry.path), framework="pt") as f:
                    _, _, meta = _read_meta(f.metadata(), entry.path)
                out.append((key, tuple(meta.tokens), entry.nbytes))
        return out

    def __contains__(self, key: StoreKey) -> bool:
        with self._lock:
            return key in self._index or key in self._pending

    @property
    def bytes_used(self) -> int:
        return self._bytes

    def clear(self) -> None:
        """Delete every file of this model and cancel the writes behind (a synchronous put
        still in flight lands afterwards)."""
        with self._lock:
            for key in [*self._index, *self._pending]:
                self._remove_locked(key)
