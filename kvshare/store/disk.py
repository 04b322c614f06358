"""Disk tier: stored segments as sealed safetensors files that survive a restart.

Layout: ``directory/<model digest>/<sha256 of (scope, content_hash)>.safetensors`` and the
store's secret ``directory/kvshare.key``. The model digest hashes the
:class:`~kvshare.store.identity.KVIdentity` (weights, KV-shaping config, dtype, attention, storage
format); the layout is only an index: every file carries that digest, its scope and content
hash, and the store's HMAC over all of it (``kvshare.store.segment_file``,
``kvshare.store.seal``), and every read checks them. File names never carry raw ids.

Bytes: ``bytes_used`` counts tensor bytes (``StoredSegment.nbytes``, the unit every tier and
the stack budget in), not file sizes: a file adds a header of ~600 bytes plus ~6 per token.

Crash safety: a file is written under a temporary name ``.<pid>.<random>.tmp`` (never a
segment name, so never indexed), fsynced, renamed to its final name with ``os.replace``
(atomic), then the directory is fsynced. A crash leaves no file or a complete one under the
final name (after a power loss a removed file may come back: still a valid segment); opening
a tier deletes temporaries whose writer process is gone. Whatever still goes wrong (bit rot,
truncation, a foreign or edited file, another model's KV) fails the seal or the header
checks: the file is deleted, counted in ``corrupt`` and the lookup misses. A path that is no
regular file (a directory, a FIFO, a symlink) or cannot be read is never opened for reading
(nor followed, nor waited on), left alone and counted in ``skipped``; nothing raises in a call.

Loading maps the opened file (a private mmap, no copy): the tensors
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

This module owns ``DiskTier``'s reads and writes (``get``, ``put``, the writer thread) and
``model_digest``; what the directory holds (the index adopted at open, ``remove``, ``listing``,
``clear``): ``kvshare.store.disk_index``.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import json
import os
import tempfile
import threading
import weakref
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

from kvshare.errors import ConfigError, StateFileError
from kvshare.files import fsync_dir
from kvshare.store.contract import StoredSegment, StoreKey
from kvshare.store.disk_index import DiskIndex, IndexEntry
from kvshare.store.seal import KEY_FILE, Sealer
from kvshare.store.segment_file import (
    NotRegularError,
    file_chunks,
    file_name,
    load,
    meta_text,
    open_regular,
)

_LIVE: weakref.WeakSet[DiskTier] = weakref.WeakSet()  # tiers that may have writes in flight


@atexit.register
def _flush_live() -> None:
    for tier in list(_LIVE):
        tier.flush()


def model_digest(identity: Any) -> str:
    """The name of ``identity``'s directory and the ``model`` every file of it carries: 32 hex
    digits of a hash of its fields (a :class:`~kvshare.store.identity.KVIdentity`, or any frozen
    dataclass that names a model)."""
    blob = json.dumps(dataclasses.asdict(identity), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def write_temp(directory: Path, chunks: list[memoryview]) -> Path:
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


class DiskTier(DiskIndex):
    """Segments as files under ``directory/<model digest>/`` (format:
    ``kvshare.store.segment_file``).

    budget_bytes: tensor bytes it may hold. identity: everything that shapes the model's KV
    (``KVIdentity.of(model)``; every file carries its digest and every read compares it).
    key_file: the store's secret (``kvshare.store.seal``; default ``directory/kvshare.key``, created
    on first use). write_behind: bytes of puts that may wait for a writer thread (0: every put
    writes before it returns; module docstring).
    Counters: corrupt: files found unusable (bad seal, identity, layout) and deleted; skipped:
    paths that are no regular file or cannot be read (a directory, a FIFO, a symlink, no
    permission), left alone and not indexed; dropped: files deleted at open because they were
    beyond the budget (the newest are kept); write_errors: puts refused (or, written behind,
    lost) for an OSError (a full disk: ENOSPC).
    Raises CacheDirError when the directory cannot be created or written, or the key file is
    unsafe; ConfigError for a bad budget.
    """

    durable = True

    def __init__(
        self,
        directory: str | Path,
        budget_bytes: int,
        identity: Any,
        write_behind: int = 0,
        key_file: str | Path | None = None,
    ) -> None:
        for what, value in (("budget_bytes", budget_bytes), ("write_behind", write_behind)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{what} must be an int >= 0, got {value!r}")
        self.write_behind = write_behind
        super().__init__(directory, budget_bytes, model_digest(identity))
        self.sealer = Sealer.at(key_file if key_file is not None else Path(directory) / KEY_FILE)
        self.write_errors = 0
        self._writer: threading.Thread | None = None
        for tier in list(_LIVE):
            if tier.path == self.path:
                tier.flush()
        self._open()
        _LIVE.add(self)

    def _load(self, path: Path, key: StoreKey) -> StoredSegment:
        """The sealed segment in ``path``: KV [L, H, S, D] mapped from the file (raises
        NotRegularError, StateFileError or OSError when the file is unusable)."""
        fd, size = open_regular(path)
        try:
            meta, kv = load(fd, size, self.sealer, path)
        finally:
            os.close(fd)
        if self._check(meta.version, meta.model, meta.key(), path) != key:
            raise StateFileError(f"{path}: holds another key")
        return StoredSegment(
            key[0], meta.content_hash, meta.tokens, kv, meta.kind, meta.role, meta.agent,
            meta.source_start, meta.slot, meta.bounds,
        )  # fmt: skip

    def _temp(self, segment: StoredSegment, text: str) -> Path:
        """``segment``'s sealed file, written to a temporary name (OSError: none is left)."""
        return write_temp(self.path, file_chunks(segment.kv, text, self.sealer))

    def put(self, segment: StoredSegment) -> bool:
        path = self.path / file_name(segment.scope, segment.content_hash)  # may raise ScopeError
        text, key, nbytes = meta_text(segment, self.model), segment.key, segment.nbytes
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
            temp = self._temp(segment, text)
            self._commit(key, IndexEntry(path, nbytes, segment.tokens), temp)
        except OSError:  # no space, no permission: the segment does not fit
            self._release(nbytes, error=True)
            return False
        except BaseException:
            self._release(nbytes)
            raise
        fsync_dir(self.path)
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
                temp: Path | None = self._temp(segment, text)
            except Exception:  # no space, no permission: the segment is lost (counted)
                temp = None
            with self._lock:
                if self._pending.get(key) is item:  # not removed (or replaced) meanwhile
                    del self._pending[key]
                    self._pending_bytes -= segment.nbytes
                    with suppress(OSError):
                        if temp is not None:
                            os.replace(temp, path)
                            entry = IndexEntry(path, segment.nbytes, segment.tokens)
                            self._index[key], temp = entry, None
                    if key not in self._index:
                        self._bytes -= segment.nbytes
                        self.write_errors += 1
                self._done.notify_all()
            if temp is not None:
                temp.unlink(missing_ok=True)
            with suppress(OSError):
                fsync_dir(self.path)

    @property
    def writing(self) -> bool:
        """Whether the writer thread is alive (it exits once its queue is empty)."""
        return self._writer is not None

    def flush(self) -> None:
        """Wait until every put written behind is committed (or failed)."""
        with self._lock:
            while self._pending:
                self._done.wait()

    def _commit(self, key: StoreKey, entry: IndexEntry, temp: Path) -> None:
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
        except (NotRegularError, OSError):  # not ours to delete, or not readable: skipped
            self._discard(key, entry, delete=False)
            return None
        except Exception:  # any failure to verify the file: a miss, never an error
            self._discard(key, entry)
            return None
        return segment if segment.tokens == tuple(tokens) else None
