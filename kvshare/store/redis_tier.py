"""``RedisTier``: the shared tier on a Redis server (``kvshare.store.shared`` for the contract).

Entries (``<prefix>`` defaults to ``kvshare``; ``<model>``: ``kvshare.store.disk.model_digest``
of the model's :class:`~kvshare.store.identity.KVIdentity`, its weight fingerprint):

- ``<prefix>:seg:<model>:<sha256 of (scope, content_hash)>``: a string, the 64 hex digits of
  the sha256 of the rest, then the segment's sealed safetensors bytes exactly as a disk tier
  file holds them (``kvshare.store.segment_file``: the JSON metadata with model, scope, tokens,
  kind, ... and the store's HMAC). Written with ``SET NX EX``: the first writer of a key wins
  atomically (two replicas writing one key at once leave one whole entry), with the TTL.
- ``<prefix>:idx:<model>:<sha256 of scope>:<window hash>``: a set of content hashes, the
  shared index (``kvshare.store.shared.sampled_windows``), with the same TTL.

Every read checks the checksum, the layout and seal, the storage format, the model digest,
the scope and content hash, and (``get``) the tokens; an entry that fails any is deleted and
counted in ``corrupt``. The HMAC secret (``TiersConfig.shared_key_file``) must be the same
file's content on every replica: an entry written without it is never served.

Faults: every call runs under ``timeout_s`` socket timeouts and no client retries; a Redis
error or timeout counts in ``failures`` and takes the tier out of use for ``retry_after_s``
(calls meanwhile miss at once: ``skipped``); the next call after that reconnects (redis-py's
pool opens a fresh connection) and counts a ``reconnect`` when it succeeds.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Hashable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from kvshare.errors import ConfigError, ScopeError, StateFileError
from kvshare.store.contract import StoredSegment, StoreKey
from kvshare.store.disk import model_digest
from kvshare.store.identity import STORAGE_FORMAT
from kvshare.store.seal import Sealer
from kvshare.store.segment_file import file_chunks, file_name, loads, meta_text, scope_json
from kvshare.store.shared import SharedTier, sampled_windows

T = TypeVar("T")
SUM = 64  # hex digits of the sha256 before the segment bytes


def scope_digest(scope: Hashable) -> str:
    """32 hex digits naming ``scope`` in index keys (never its raw ids; ScopeError if it
    cannot be stored)."""
    blob = json.dumps(scope_json(scope), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class RedisTier(SharedTier):
    """Segments on the Redis server at ``url`` for the model ``identity``.

    sealer: the replicas' shared secret; ttl_s: seconds an entry lives unless read again
    (a hit renews it); timeout_s: socket timeout of every call; retry_after_s: how long a
    failure keeps the tier out of use; prefix: of every key. Opening never fails for the
    server: a server that is down at start is a tier that misses until it is up.
    """

    name = "redis"

    def __init__(
        self,
        url: str,
        identity: Any,
        sealer: Sealer,
        ttl_s: int = 86_400,
        timeout_s: float = 0.25,
        retry_after_s: float = 0.5,
        prefix: str = "kvshare",
    ) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.url, self.identity, self.sealer = url, identity, sealer
        self.model = model_digest(identity)
        self.ttl_s, self.retry_after_s, self.prefix = int(ttl_s), retry_after_s, prefix
        self.client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0), health_check_interval=0,
        )  # fmt: skip
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self.counts: Counter[str] = Counter()
        self.last_error = ""
        self._down_until = 0.0
        self._was_down = False
        self._lock = threading.Lock()

    @classmethod
    def open(cls, url: str, identity: Any, cfg: Any, prefix: str = "kvshare") -> RedisTier:
        """The tier a ``TiersConfig`` asks for (its ``shared_*`` fields), keys under ``prefix``."""
        key_file = cfg.shared_key_file
        if key_file is None:
            from kvshare.model.cache import kvshare_home

            key_file = str(Path(kvshare_home()) / "shared-tier.key")
        sealer, ttl, timeout = Sealer.at(key_file), cfg.shared_ttl_s, cfg.shared_timeout_s
        return cls(url, identity, sealer, ttl, timeout, prefix=prefix)

    # --- keys and the fault guard -------------------------------------------------------

    def entry_key(self, key: StoreKey) -> str:
        return f"{self.prefix}:seg:{self.model}:{file_name(*key).removesuffix('.safetensors')}"

    def index_key(self, scope: Hashable, window: int) -> str:
        return f"{self.prefix}:idx:{self.model}:{scope_digest(scope)}:{window:016x}"

    def _guard(self, what: Callable[[], T], default: T) -> T:
        """``what()``, or ``default`` when Redis fails (counted; the tier pauses)."""
        with self._lock:
            if time.monotonic() < self._down_until:
                self.counts["skipped"] += 1
                return default
        try:
            out = what()
        except self._errors as exc:
            with self._lock:
                self.counts["failures"] += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                self._down_until = time.monotonic() + self.retry_after_s
                self._was_down = True
            return default
        with self._lock:
            if self._was_down:
                self.counts["reconnects"] += 1
                self._was_down = False
        return out

    # --- writes ---------------------------------------------------------------------------

    def put(self, segment: StoredSegment) -> bool:
        try:
            text = meta_text(segment, self.model)
            index = [self.index_key(segment.scope, h) for h in sampled_windows(segment.tokens)]
        except (ConfigError, ScopeError):
            self.counts["refused"] += 1
            return False
        body = b"".join(file_chunks(segment.kv, text, self.sealer))
        value = hashlib.sha256(body).hexdigest().encode() + body

        def write() -> bool:
            pipe = self.client.pipeline(transaction=False)
            pipe.set(self.entry_key(segment.key), value, nx=True, ex=self.ttl_s)
            for name in index:
                pipe.sadd(name, segment.content_hash)
                pipe.expire(name, self.ttl_s)
            pipe.execute()
            return True

        done = self._guard(write, False)
        self.counts["puts"] += done
        return done

    def remove(self, key: StoreKey) -> int:
        name = self.entry_key(key)

        def drop() -> int:
            pipe = self.client.pipeline(transaction=False)
            pipe.strlen(name)
            pipe.delete(name)
            size, _ = pipe.execute()
            return max(int(size) - SUM, 0)

        return self._guard(drop, 0)

    def clear(self) -> None:
        """Delete every entry and index set of this model (SCAN, then DEL in batches)."""

        def wipe() -> None:
            batch = []
            for name in self.client.scan_iter(match=f"{self.prefix}:*:{self.model}:*", count=500):
                batch.append(name)
                if len(batch) >= 500:
                    self.client.delete(*batch)
                    batch.clear()
            if batch:
                self.client.delete(*batch)

        self._guard(wipe, None)

    # --- reads ------------------------------------------------------------------------------

    def verify(self, key: StoreKey, value: bytes | None) -> StoredSegment | None:
        """The segment in ``value`` if every check passes (StateFileError otherwise)."""
        if value is None:
            return None
        body, where = value[SUM:], f"redis entry {self.entry_key(key)}"
        if hashlib.sha256(body).hexdigest().encode() != value[:SUM]:
            raise StateFileError(f"{where}: checksum mismatch (corrupt or truncated)")
        meta, kv = loads(body, self.sealer, where)
        if meta.version != STORAGE_FORMAT or meta.model != self.model:
            raise StateFileError(f"{where}: KV of another model, configuration or format")
        if meta.key() != key:
            raise StateFileError(f"{where}: holds another scope or content")
        return StoredSegment(
            key[0], meta.content_hash, meta.tokens, kv, meta.kind, meta.role, meta.agent,
            meta.source_start, meta.slot, meta.bounds,
        )  # fmt: skip

    def fetch(self, keys: Sequence[StoreKey]) -> list[StoredSegment | None]:
        """The verified segments of ``keys`` (None: absent, or deleted for a failed check),
        read in one pipeline; a hit renews its TTL."""
        names = [self.entry_key(k) for k in keys]

        def read() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for name in names:
                pipe.getex(name, ex=self.ttl_s)
            return list(pipe.execute())

        out: list[StoredSegment | None] = []
        values = self._guard(read, [None] * len(keys))
        for key, name, value in zip(keys, names, values, strict=True):
            try:
                out.append(self.verify(key, value))
            except (StateFileError, ValueError, TypeError, RuntimeError):
                self.counts["corrupt"] += 1
                self._delete(name)
                out.append(None)
        self.counts["hits"] += sum(s is not None for s in out)
        self.counts["misses"] += sum(s is None for s in out)
        return out

    def get(self, key: StoreKey, tokens: Sequence[int]) -> StoredSegment | None:
        seg = self.fetch([key])[0]
        if seg is not None and seg.tokens != tuple(tokens):
            self.counts["corrupt"] += 1
            self._delete(self.entry_key(key))
            return None
        return seg

    def candidates(
        self, scope: Hashable, tokens: Sequence[int], limit: int, exclude: Collection[StoreKey]
    ) -> list[StoredSegment]:
        try:
            names = [self.index_key(scope, h) for h in sampled_windows(tokens)]
        except ScopeError:
            return []
        if not names:
            return []

        def look() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for name in names:
                pipe.smembers(name)
            return list(pipe.execute())

        votes: Counter[str] = Counter()
        found: list[Any] = self._guard(look, [])
        for members in found:
            votes.update(m.decode() if isinstance(m, bytes) else str(m) for m in members)
        keys = [(scope, h) for h, _ in votes.most_common() if (scope, h) not in exclude]
        return [s for s in self.fetch(keys[:limit]) if s is not None]

    # --- blobs (anchor pools): <prefix>:<kind>:<model>:<scope digest>, HMAC + bytes ---------

    def _blob(self, kind: str, scope: Hashable) -> tuple[str, bytes]:
        """The key of a blob and what its seal covers besides the data (ScopeError)."""
        name = f"{self.prefix}:{kind}:{self.model}:{scope_digest(scope)}"
        return name, name.encode() + b"\0"

    def put_blob(self, kind: str, scope: Hashable, data: bytes) -> bool:
        name, head = self._blob(kind, scope)
        value = self.sealer.seal([head, data]).encode() + data
        return self._guard(lambda: bool(self.client.set(name, value, ex=self.ttl_s)), False)

    def get_blob(self, kind: str, scope: Hashable) -> bytes | None:
        name, head = self._blob(kind, scope)
        value: Any = self._guard(lambda: self.client.getex(name, ex=self.ttl_s), None)
        if value is None:
            return None
        if self.sealer.check(value[:SUM].decode(errors="replace"), [head, value[SUM:]]):
            return bytes(value[SUM:])
        self.counts["corrupt"] += 1
        self._delete(name)
        return None

    def drop_blob(self, kind: str, scope: Hashable) -> None:
        self._delete(self._blob(kind, scope)[0])

    def _delete(self, name: str) -> None:
        self._guard(lambda: self.client.delete(name), 0)

    def __contains__(self, key: StoreKey) -> bool:
        return bool(self._guard(lambda: self.client.exists(self.entry_key(key)), 0))

    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)
