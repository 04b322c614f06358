"""Shared tiers: KV that several engines (replicas) read and write, found by content.

A :class:`SharedTier` is a :class:`~kvshare.store.tiers.KVTier` that lives outside the process
(a Redis server: ``kvshare.store.redis_tier``) and is *not* one of a stack's tiers: a
``TieredStore`` writes every segment it stores through to it, and on a local miss asks it for
candidates (:meth:`SharedTier.candidates`: segments of the same scope whose sampled windows the
prompt shares), which it adopts into its own tiers. Another replica's work becomes reusable
that way, and nothing else crosses: candidates are per scope, and every segment served was
verified (checksum, seal, model fingerprint, scope, tokens).

The index is sparse and content-defined (:func:`sampled_windows`, winnowing): of every
``WINNOW`` consecutive ``MIN_MATCH``-token windows the one with the smallest hash is indexed,
and a prompt looks up the same selection of its own windows. Any run of at least
``MIN_MATCH + WINNOW - 1`` tokens that a prompt shares with a stored segment contains
``WINNOW`` whole windows of both, whose minimum both sides select: such a run is always found,
while writes and lookups touch ~2 / (``WINNOW`` + 1) of the windows.

Owns the contract, its naive in-process implementation (:class:`MemorySharedTier`, the oracle
of the tests: ``memory://<name>`` in ``TiersConfig.shared_tier``), the registry of backends by
URL scheme (``SHARED_TIERS``: ``redis`` imported lazily) and :func:`build_shared`.
"""

from __future__ import annotations

import threading
from abc import abstractmethod
from collections import Counter
from collections.abc import Collection, Hashable, Sequence
from typing import Any, ClassVar

import numpy as np

from kvshare.errors import ConfigError
from kvshare.registry import Registry
from kvshare.store.contract import StoredSegment, StoreKey
from kvshare.store.segments import window_hashes
from kvshare.store.tiers import KVTier

WINNOW = 16  # windows per winnowing span: shared runs of >= 31 tokens are always found


def sampled_windows(tokens: Sequence[int]) -> list[int]:
    """The distinct window hashes of ``tokens`` that the shared index keeps: the smallest
    hash of every ``WINNOW`` consecutive windows (of all of them when there are fewer)."""
    hashes = np.asarray(window_hashes(tokens), dtype=np.uint64)
    if hashes.size == 0:
        return []
    if hashes.size <= WINNOW:
        return [int(hashes.min())]
    picked = np.lib.stride_tricks.sliding_window_view(hashes, WINNOW).min(axis=1)
    return list(dict.fromkeys(int(h) for h in picked))


class SharedTier(KVTier):
    """Contract of a shared tier, beyond :class:`KVTier`'s:

    - No call raises for the service (down, slow, full): ``put`` returns False, a lookup
      misses, and the failure is counted in :meth:`stats`; the tier reconnects by itself.
    - ``put`` also indexes the segment's sampled windows under its scope; ``get`` and
      ``candidates`` serve only entries whose checks pass, and delete the others.
    - ``candidates(scope, tokens, limit, exclude)``: at most ``limit`` verified segments of
      ``scope`` (none of ``exclude``) sharing sampled windows with ``tokens``, most first.
    - ``keys`` and ``listing`` are empty (a stack adopts nothing wholesale: it asks
      ``candidates``); ``budget_bytes`` and ``bytes_used`` are 0: the server's own limits
      (Redis ``maxmemory`` and its eviction policy, the TTL) bound what it holds.
    """

    budget_bytes = 0

    @abstractmethod
    def candidates(
        self, scope: Hashable, tokens: Sequence[int], limit: int, exclude: Collection[StoreKey]
    ) -> list[StoredSegment]: ...

    @abstractmethod
    def stats(self) -> dict[str, int]:
        """Counters: puts, hits, misses, corrupt (entries that failed a check, deleted),
        failures (calls the service failed), skipped (calls made while it was down),
        reconnects (returns to service after a failure)."""

    @abstractmethod
    def put_blob(self, kind: str, scope: Hashable, data: bytes) -> bool:
        """Keep ``data`` as the ``kind`` blob of ``scope`` (an anchor pool: ``kind="pool"``),
        replacing the last; False when the service failed."""

    @abstractmethod
    def get_blob(self, kind: str, scope: Hashable) -> bytes | None:
        """The ``kind`` blob of ``scope`` written by a holder of this tier's secret, or None
        (absent, or sealed by someone else: then deleted and counted in ``corrupt``)."""

    @abstractmethod
    def drop_blob(self, kind: str, scope: Hashable) -> None:
        """Delete the ``kind`` blob of ``scope`` (a reader found it unusable)."""

    def keys(self) -> list[StoreKey]:
        return []

    def listing(self) -> list[tuple[StoreKey, tuple[int, ...], int]]:
        return []

    @property
    def bytes_used(self) -> int:
        return 0


class MemorySharedTier(SharedTier):
    """The naive shared tier: segments in a dict per ``name``, shared by every tier of that
    name in this process (two engines of one test); never fails, checks only tokens."""

    name = "memory"
    _spaces: ClassVar[dict[str, dict[StoreKey, StoredSegment]]] = {}
    _blob_spaces: ClassVar[dict[str, dict[tuple[str, Hashable], bytes]]] = {}
    _lock = threading.Lock()

    def __init__(self, space: str) -> None:
        with self._lock:
            self._items = self._spaces.setdefault(space, {})
            self._blobs = self._blob_spaces.setdefault(space, {})
        self._counts: Counter[str] = Counter()

    def put(self, segment: StoredSegment) -> bool:
        with self._lock:
            self._items.setdefault(segment.key, segment)
            self._counts["puts"] += 1
            return True

    def get(self, key: StoreKey, tokens: Sequence[int]) -> StoredSegment | None:
        with self._lock:
            seg = self._items.get(key)
        hit = seg is not None and seg.tokens == tuple(tokens)
        self._counts["hits" if hit else "misses"] += 1
        return seg if hit else None

    def candidates(
        self, scope: Hashable, tokens: Sequence[int], limit: int, exclude: Collection[StoreKey]
    ) -> list[StoredSegment]:
        wanted = set(sampled_windows(tokens))
        with self._lock:
            segs = [s for k, s in self._items.items() if k[0] == scope and k not in exclude]
        votes = [(len(wanted.intersection(sampled_windows(s.tokens))), s) for s in segs]
        found = sorted((v for v in votes if v[0]), key=lambda v: -v[0])[:limit]
        self._counts["hits"] += len(found)
        return [s for _, s in found]

    def remove(self, key: StoreKey) -> int:
        with self._lock:
            seg = self._items.pop(key, None)
        return 0 if seg is None else seg.nbytes

    def __contains__(self, key: StoreKey) -> bool:
        with self._lock:
            return key in self._items

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def put_blob(self, kind: str, scope: Hashable, data: bytes) -> bool:
        with self._lock:
            self._blobs[(kind, scope)] = data
        return True

    def get_blob(self, kind: str, scope: Hashable) -> bytes | None:
        with self._lock:
            return self._blobs.get((kind, scope))

    def drop_blob(self, kind: str, scope: Hashable) -> None:
        with self._lock:
            self._blobs.pop((kind, scope), None)

    def stats(self) -> dict[str, int]:
        return dict(self._counts)


def _redis() -> type[SharedTier]:
    from kvshare.store.redis_tier import RedisTier

    return RedisTier


SHARED_TIERS: Registry[type[SharedTier]] = Registry("shared tier")
SHARED_TIERS.register("memory", lambda: MemorySharedTier)
SHARED_TIERS.register("redis", _redis)


def build_shared(cfg: Any, model: Any, prefix: str = "kvshare") -> SharedTier | None:
    """The shared tier ``cfg.shared_tier`` (a ``TiersConfig``) names by its URL's scheme
    (``redis://host:port/db``, ``memory://name``), its entries bound to the model's
    :class:`~kvshare.store.identity.KVIdentity` under the key namespace ``prefix``; None when
    it names none."""
    url = cfg.shared_tier
    if url is None:
        return None
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ConfigError(f"shared_tier must be a URL (redis://127.0.0.1:6379/0), got {url!r}")
    kind = SHARED_TIERS.create(scheme)
    if kind is MemorySharedTier:
        return MemorySharedTier(f"{rest}/{prefix}")
    from kvshare.store.identity import KVIdentity

    return kind.open(url, KVIdentity.of(model), cfg, prefix)  # type: ignore[attr-defined]
