"""API keys: the only thing that says which tenant a request belongs to.

A key reads ``kvs_<id>_<secret>`` (id: 8 hex digits naming its entry; secret: 32 random
bytes, url-safe base64). The keys file (JSON, written atomically) keeps per entry the id, the
tenant name, a random 16-byte salt and ``scrypt(secret, salt)``; never the key. Checking a
key: find its entry by id, recompute scrypt, compare in constant time (``hmac.compare_digest``).
A key that passed once is remembered for the process by an HMAC of it under a per-process
secret, so later requests cost one HMAC instead of one scrypt (about 30 ms); unknown ids are
refused without any scrypt. A change to the keys file (a key added, one removed) is seen
without a restart: the file's stat (mtime, size, inode) is compared at most once a second,
and a changed file is read again and every remembered key forgotten (a removed key stops
working at once); a changed file that cannot be read keeps the previous keys (logged).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from kvshare.errors import ConfigError, KVShareError
from kvshare.scope import check_id

SCRYPT = {"n": 1 << 14, "r": 8, "p": 1}  # ~16 MiB and ~30 ms per check on one core
_KEY = re.compile(r"kvs_([0-9a-f]{8})_([A-Za-z0-9_-]{43})")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
log = logging.getLogger("kvshare.serve")


class AuthError(KVShareError, PermissionError):
    """A request without an API key, or with one that no entry of the keys file matches."""


@dataclass(frozen=True)
class KeyEntry:
    """One stored key: its id, tenant name, salt and scrypt digest (bytes)."""

    id: str
    tenant: str
    salt: bytes
    digest: bytes


def _scrypt(secret: str, salt: bytes) -> bytes:
    return hashlib.scrypt(secret.encode(), salt=salt, dklen=32, **SCRYPT)


def read_keys(path: str | Path) -> dict[str, KeyEntry]:
    """Entries by id of a keys file (a missing file: none); ConfigError when it is corrupt."""
    p = Path(path)
    if not p.exists():
        return {}
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
        entries = [
            KeyEntry(e["id"], e["tenant"], bytes.fromhex(e["salt"]), bytes.fromhex(e["hash"]))
            for e in data["keys"]
        ]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"keys file {str(p)!r} is unreadable or corrupt: {exc}") from exc
    return {e.id: e for e in entries}


def add_key(path: str | Path, tenant: str) -> str:
    """Add a new key for ``tenant`` to the keys file (made when missing) and return the key:
    the only time it is ever shown. ConfigError for a bad tenant name."""
    if not isinstance(tenant, str) or not _NAME.fullmatch(tenant):
        raise ConfigError(
            f"tenant name {tenant!r}: 1-64 letters, digits, '.', '_' or '-', starting with a "
            f"letter or digit"
        )
    entries = read_keys(path)
    key_id = secrets.token_hex(4)
    while key_id in entries:
        key_id = secrets.token_hex(4)
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    salt = secrets.token_bytes(16)
    entries[key_id] = KeyEntry(key_id, tenant, salt, _scrypt(secret, salt))
    _write(Path(path), entries)
    return f"kvs_{key_id}_{secret}"


def _write(path: Path, entries: dict[str, KeyEntry]) -> None:
    rows = [
        {"id": e.id, "tenant": e.tenant, "salt": e.salt.hex(), "hash": e.digest.hex()}
        for e in entries.values()
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"version": 1, "keys": rows}, f, indent=1)
    os.replace(tmp, path)


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """(mtime ns, size, inode) of ``path``; None when it is missing."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


class KeyChecker:
    """Tenant of a bearer key (see the module docstring); thread-safe. ``path``: the keys
    file ``entries`` came from, checked for changes at most every ``check_s`` seconds (None:
    the entries never change)."""

    def __init__(
        self, entries: dict[str, KeyEntry], path: str | Path | None = None, check_s: float = 1.0
    ) -> None:
        self.entries = entries
        self.path, self.check_s = (Path(path) if path is not None else None), check_s
        self._stamp = _stamp(self.path) if self.path is not None else None
        self._next_check = time.monotonic() + check_s
        self._pepper = secrets.token_bytes(32)
        self._seen: dict[bytes, str] = {}
        self._generation = 0  # entries read so far: a check against older ones is not kept
        self._lock = threading.Lock()

    @classmethod
    def of_file(cls, path: str | Path, check_s: float = 1.0) -> KeyChecker:
        """A checker over the keys file ``path`` (ConfigError when it is corrupt)."""
        stamp = _stamp(Path(path))
        checker = cls(read_keys(path), path, check_s)
        checker._stamp = stamp  # as read: a change made meanwhile is seen at the next check
        return checker

    def _refresh(self) -> None:
        """Read the keys file again when its stat changed (one ``stat`` at most every
        ``check_s`` seconds; the others cost one clock read)."""
        if self.path is None or time.monotonic() < self._next_check:
            return
        with self._lock:
            self._next_check = time.monotonic() + self.check_s
            stamp = _stamp(self.path)
            if stamp == self._stamp:
                return
            try:
                entries = read_keys(self.path)
            except ConfigError as exc:
                log.error("the keys file changed but cannot be read; keeping its keys: %s", exc)
                return
            self.entries, self._stamp = entries, stamp
            self._generation += 1
            self._seen.clear()

    def known(self, authorization: str | None) -> str | None:
        """The tenant of a key that passed before (one HMAC, no scrypt), else None;
        AuthError when the header is missing or not ``Bearer KEY``."""
        self._refresh()
        mark = self._mark(_bearer(authorization))
        with self._lock:
            return self._seen.get(mark)

    def tenant(self, authorization: str | None) -> str:
        """The tenant of an ``Authorization`` header value; AuthError when it is missing,
        not ``Bearer KEY``, or matches no entry (one scrypt for a key not seen before)."""
        self._refresh()
        key = _bearer(authorization)
        mark = self._mark(key)
        with self._lock:
            known, generation, entries = self._seen.get(mark), self._generation, self.entries
        if known is not None:
            return known
        match = _KEY.fullmatch(key)
        entry = entries.get(match.group(1)) if match else None
        if match is None or entry is None:
            raise AuthError("unknown API key")
        if not hmac.compare_digest(_scrypt(match.group(2), entry.salt), entry.digest):
            raise AuthError("unknown API key")
        tenant = check_id("tenant", entry.tenant)
        assert tenant is not None
        with self._lock:
            if len(self._seen) < 100_000 and generation == self._generation:
                self._seen[mark] = tenant
        return tenant

    def _mark(self, key: str) -> bytes:
        return hmac.new(self._pepper, key.encode(), hashlib.sha256).digest()


def _bearer(authorization: str | None) -> str:
    """The key of a ``Bearer KEY`` header value; AuthError otherwise."""
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise AuthError("missing API key: send 'Authorization: Bearer <key>'")
    return key.strip()
