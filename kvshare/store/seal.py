"""Authenticated stored KV: an HMAC-SHA256 over every stored entry, keyed by a per-store secret.

A checksum tells bit rot; anyone can recompute one after editing a file (a scope that names
another tenant, another model's KV). A MAC cannot be recomputed without the secret, so an entry
written or edited by anyone who lacks it is never served. Every tier that keeps KV outside the
process (the disk tier now, a shared tier later) seals what it writes and checks the seal of
what it reads with one :class:`Sealer`.

The secret: 32 random bytes in a key file, by default ``<store directory>/kvshare.key``, created
on first use with owner-only permissions (0600, never through a symlink, atomically: a second
process opening the store at the same time reads the same secret), or an operator's file
(``TiersConfig.disk_key_file``). A key file that is not a regular file, not 32 bytes, not owned
by this user or readable by others is refused with :class:`~kvshare.errors.CacheDirError`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from collections.abc import Iterable
from pathlib import Path

from kvshare.errors import CacheDirError

KEY_BYTES = 32
KEY_FILE = "kvshare.key"


class Sealer:
    """Seals (``seal``) and checks (``check``) byte strings with one secret. Thread-safe."""

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            raise CacheDirError(f"a store secret is {KEY_BYTES} bytes")
        self._key = key

    def seal(self, parts: Iterable[bytes | memoryview]) -> str:
        """HMAC-SHA256 of the concatenated ``parts``, as 64 hex digits."""
        mac = hmac.new(self._key, digestmod=hashlib.sha256)
        for part in parts:
            mac.update(part)
        return mac.hexdigest()

    def check(self, seal: str, parts: Iterable[bytes | memoryview]) -> bool:
        """Whether ``seal`` is this secret's seal of ``parts`` (constant-time compare)."""
        return isinstance(seal, str) and hmac.compare_digest(seal, self.seal(parts))

    @classmethod
    def at(cls, path: str | os.PathLike[str]) -> Sealer:
        """The sealer of the key file ``path``, created (0600) when there is none."""
        path = Path(path)
        try:
            return cls(_read_key(path))
        except FileNotFoundError:
            pass
        _create_key(path)
        return cls(_read_key(path))


def _read_key(path: Path) -> bytes:
    """The secret in ``path`` (FileNotFoundError when there is none; CacheDirError when the
    file is unsafe or unreadable). Opened without following a symlink or blocking."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise CacheDirError(f"cannot open the store key {path}: {exc.strerror or exc}") from exc
    try:
        info = os.fstat(fd)
        problem = _unsafe(info)
        if problem:
            raise CacheDirError(f"refusing the store key {path}: {problem}")
        key = os.read(fd, KEY_BYTES + 1)
    except OSError as exc:
        raise CacheDirError(f"cannot read the store key {path}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    if len(key) != KEY_BYTES:
        raise CacheDirError(f"refusing the store key {path}: {len(key)} bytes, not {KEY_BYTES}")
    return key


def _unsafe(info: os.stat_result) -> str:
    """Why a key file with this status must not be used ('' when it may)."""
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if info.st_uid != os.geteuid():
        return f"owned by uid {info.st_uid}, not this user ({os.geteuid()})"
    if info.st_mode & 0o077:
        return f"mode {stat.S_IMODE(info.st_mode):04o} lets others read it (chmod 600)"
    return ""


def _create_key(path: Path) -> None:
    """Write a new secret to ``path`` unless another writer got there first (a temporary
    file linked into place: readers never see a partial key)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, secrets.token_bytes(KEY_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temp, path)
        except FileExistsError:
            pass  # another process created it: use theirs
        finally:
            temp.unlink(missing_ok=True)
    except OSError as exc:
        raise CacheDirError(
            f"cannot create the store key {path}: {exc.strerror or exc}; the directory must be "
            f"writable (or give an existing key file: TiersConfig.disk_key_file)"
        ) from exc
