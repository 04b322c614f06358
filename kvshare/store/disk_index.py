"""A disk tier's index: what its directory holds, found at open and kept since.

Owns ``IndexEntry`` (one indexed file: its path, tensor bytes and token ids) and ``DiskIndex``:
the directory ``directory/<model digest>/``, the index of its segment files (adopted at open
from their headers, within the budget), the puts still written behind, the byte count and the
``corrupt``/``skipped``/``dropped`` counters, and what only consults or drops them (``remove``,
``keys``, ``listing``, ``clear``). Reading and writing files: ``kvshare.store.disk``.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import threading
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from kvshare.errors import CacheDirError, StateFileError
from kvshare.store.contract import StoredSegment, StoreKey
from kvshare.store.identity import STORAGE_FORMAT
from kvshare.store.segment_file import NotRegularError, file_name, open_regular, read_meta
from kvshare.store.tiers import KVTier

_SEGMENT = re.compile(r"[0-9a-f]{64}\.safetensors")
_TEMP = re.compile(r"\.(\d+)\..+\.tmp")  # .<writer pid>.<random>.tmp


@dataclass(frozen=True, eq=False)
class IndexEntry:
    """An indexed file, the tensor bytes and the token ids it holds (compared by identity)."""

    path: Path
    nbytes: int
    tokens: tuple[int, ...]


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (a temporary file of a live writer is left alone)."""
    try:
        os.kill(pid, 0)  # signal 0: only checks that it exists
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # it exists, under another user
        pass
    return True


def _is_regular(path: Path) -> bool:
    """Whether ``path`` itself (not a symlink's target) is a regular file."""
    with suppress(OSError):
        return stat.S_ISREG(os.lstat(path).st_mode)
    return False


class DiskIndex(KVTier):
    """The files of one model under ``directory/<model>/`` (``model``: its digest) and the
    puts pending for it, within ``budget_bytes`` of tensor bytes. Raises CacheDirError when
    the directory cannot be created or written."""

    name = "disk"

    def __init__(self, directory: str | Path, budget_bytes: int, model: str) -> None:
        self.budget_bytes, self.model = budget_bytes, model
        self.path = Path(directory) / self.model
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            if self.path.is_symlink():  # never follow a link we did not write
                raise NotADirectoryError(errno.ENOTDIR, "a symlink, not a directory")
            if not os.access(self.path, os.W_OK | os.X_OK):  # refused here, not in a call
                raise PermissionError(errno.EACCES, "not writable (read-only?)")
        except OSError as exc:
            raise CacheDirError(
                f"the disk tier at {self.path} cannot be created or written: {exc.strerror or exc}"
            ) from exc
        self.corrupt = self.skipped = self.dropped = 0
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)  # a write behind finished
        self._index: dict[StoreKey, IndexEntry] = {}
        self._pending: dict[StoreKey, tuple[StoredSegment, Path, str]] = {}
        self._pending_bytes = 0
        self._bytes = 0

    def _open(self) -> None:
        """Delete stale temporaries, then index this model's files, newest first, while they
        fit the budget; files with a bad header are deleted (corrupt), paths that are no
        regular file or cannot be read are left alone (skipped), the rest beyond the budget
        are deleted (dropped). Nothing here blocks or raises for what the directory holds."""
        found = []
        for path in self.path.iterdir():
            temp = _TEMP.fullmatch(path.name)
            if temp and not _alive(int(temp.group(1))) and _is_regular(path):
                path.unlink(missing_ok=True)
            elif _SEGMENT.fullmatch(path.name):
                with suppress(OSError):
                    found.append((path.lstat().st_mtime_ns, path))
        for _, path in sorted(found, reverse=True):
            try:
                key, nbytes, tokens = self._header(path)
            except (NotRegularError, OSError):
                self.skipped += 1
                continue
            except Exception:  # any failure to parse a header: a corrupt file
                self.corrupt += 1
                path.unlink(missing_ok=True)
                continue
            if self._bytes + nbytes > self.budget_bytes:
                self.dropped += 1
                path.unlink(missing_ok=True)
                continue
            self._index[key] = IndexEntry(path, nbytes, tokens)
            self._bytes += nbytes

    def _header(self, path: Path) -> tuple[StoreKey, int, tuple[int, ...]]:
        """The key of ``path``, its tensor bytes and token ids, from its header alone
        (unsealed: only an index; ``get`` checks the seal before anything is served)."""
        fd, size = open_regular(path)
        try:
            meta = read_meta(fd, size, path)[0]
        finally:
            os.close(fd)
        key = self._check(meta.version, meta.model, meta.key(), path)
        return key, meta.nbytes(), meta.tokens

    def _check(self, version: int, model: str, key: StoreKey, path: Path) -> StoreKey:
        """``key`` after checking the file's format version, KV identity and name."""
        if version != STORAGE_FORMAT:
            raise StateFileError(f"{path}: storage format {version}, not {STORAGE_FORMAT}")
        if model != self.model:
            raise StateFileError(f"{path}: KV of another model or configuration ({model})")
        if file_name(*key) != path.name:
            raise StateFileError(f"{path}: its name is not the hash of its key")
        return key

    def _discard(self, key: StoreKey, entry: IndexEntry, delete: bool = True) -> None:
        """Forget ``key`` (and delete its corrupt file when ``delete``), unless a remove or
        put changed ``key`` since it was read; counted in ``corrupt`` or ``skipped``."""
        with self._lock:
            if self._index.get(key) is not entry:
                return
            if delete:
                self._remove_locked(key)
                self.corrupt += 1
            else:
                self._index.pop(key)
                self._bytes -= entry.nbytes
                self.skipped += 1

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
        """From the index (the headers were read once, at open; no I/O here): a file that
        went bad since is left to the next ``get``, which drops it as corrupt."""
        with self._lock:
            out = [(k, p[0].tokens, p[0].nbytes) for k, p in self._pending.items()]
            return out + [(k, e.tokens, e.nbytes) for k, e in self._index.items()]

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
