"""Content-addressed store of computed KV (every call's whole sequence) at canonical positions.

Every call leaves one *trace*: its prompt and its reply's decode-phase KV, in the context it
was computed in. Any stretch of any trace can be relocated into a later prompt; matching
prefers the longest verified run, i.e. the source whose own context agrees with the target's
over the most tokens (the deviation of reused KV grows with the context that differs).

Owns the window hashing and index that find those runs (``window_hashes``, ``WindowIndex``,
``match_indexed``) and the in-memory stores (``NullSegmentStore``, ``LRUSegmentStore``). The
segment and the store contract (``StoredSegment``, ``Match``, ``SegmentStore``, ``StoreKey``,
``User``, ``MIN_MATCH``) live in ``kvshare.store.contract`` and are importable from here too.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence
from itertools import islice
from typing import Any

import numpy as np

from kvshare.model.prompt import common_prefix
from kvshare.store.contract import (
    MIN_MATCH,
    Match,
    SegmentStore,
    StoredSegment,
    StoreKey,
    User,
)

_MASK = (1 << 64) - 1
_POWERS = np.array(
    [pow(0x9E3779B97F4A7C15, MIN_MATCH - 1 - j, 1 << 64) for j in range(MIN_MATCH)],
    dtype=np.uint64,
)


def window_hashes(tokens: Sequence[int]) -> list[int]:
    """A hash of every ``MIN_MATCH``-token window of ``tokens`` ([n - MIN_MATCH + 1] ints):
    a polynomial hash mod 2^64, computed for all windows at once (numpy wraps uint64
    arithmetic). Collisions only add candidates: every match is verified token by token."""
    if len(tokens) < MIN_MATCH:
        return []
    ids = np.asarray(tokens, dtype=np.uint64)
    windows = np.lib.stride_tricks.sliding_window_view(ids, MIN_MATCH)
    hashes: list[int] = (windows * _POWERS).sum(axis=1, dtype=np.uint64).tolist()
    return hashes


def greedy_matches(query: Sequence[int], candidates: Any, min_len: int) -> list[Match]:
    """Left-to-right longest verified matches of ``query`` against stored segments.

    candidates(i) yields (segment, offset) pairs that may match ``query[i:i+min_len]``, oldest
    first; every candidate is verified token by token and extended as far as it goes. Among
    equally long runs the last candidate (the newest segment) wins: an agent reads its prefix
    from its latest trace, so the older copies fall out of use and can go first.
    """
    out: list[Match] = []
    i, n = 0, len(query)
    while i + min_len <= n:
        best: Match | None = None
        for seg, off in candidates(i):
            length = common_prefix(islice(seg.tokens, off, None), islice(query, i, None))
            if length >= min_len and (best is None or length >= best.length):
                best = Match(i, length, seg, off)
        if best is None:
            i += 1
        else:
            out.append(best)
            i += best.length
    return out


class NullSegmentStore(SegmentStore):
    """Stores nothing (the naive implementation; every lookup misses)."""

    budget_bytes = 0

    def put(
        self, segment: StoredSegment, user: User = (None, None), readers: Iterable[str] = ()
    ) -> bool:
        return False

    def get(
        self, scope: Hashable, content_hash: str, tokens: Sequence[int]
    ) -> StoredSegment | None:
        return None

    def match(
        self, scope: Hashable, tokens: Sequence[int], min_len: int = MIN_MATCH
    ) -> list[Match]:
        return []

    def __contains__(self, key: StoreKey) -> bool:
        return False

    def __len__(self) -> int:
        return 0

    @property
    def bytes_used(self) -> int:
        return 0

    def clear(self) -> None:
        pass


class WindowIndex:
    """Per scope: the hash of every ``MIN_MATCH``-token window of every indexed segment ->
    (segment id, offset). Not thread-safe (its store locks around it).

    Entries are plain ints (``id << 32 | offset``, or a list of them), so indexing a trace
    allocates no objects the garbage collector tracks (a tuple per window made every put
    trigger collections over the whole heap: 14 ms -> 0.7 ms per 2.3K-token trace).
    """

    def __init__(self) -> None:
        self._windows: dict[Hashable, dict[int, int | list[int]]] = {}
        self._ids: dict[StoreKey, int] = {}
        self._keys: dict[int, StoreKey] = {}
        self._next_id = 0

    def add(self, key: StoreKey, tokens: Sequence[int]) -> None:
        sid = self._next_id = self._next_id + 1
        self._ids[key], self._keys[sid] = sid, key
        table = self._windows.setdefault(key[0], {})
        for off, h in enumerate(window_hashes(tokens)):
            entry, old = sid << 32 | off, table.get(h)
            if old is None:
                table[h] = entry
            elif isinstance(old, int):
                table[h] = [old, entry]
            else:
                old.append(entry)

    def remove(self, key: StoreKey, tokens: Sequence[int]) -> None:
        sid = self._ids.pop(key)
        del self._keys[sid]
        table = self._windows.get(key[0], {})
        for h in set(window_hashes(tokens)):
            old = table.get(h)
            rest = [e for e in ([old] if isinstance(old, int) else old or []) if e >> 32 != sid]
            if not rest:
                table.pop(h, None)
            else:
                table[h] = rest[0] if len(rest) == 1 else rest
        if not table:
            self._windows.pop(key[0], None)

    def scopes(self) -> set[Hashable]:
        """The scopes with at least one indexed window."""
        return set(self._windows)

    def keys(self) -> list[StoreKey]:
        """The indexed segments, in the order they were added."""
        return list(self._ids)

    def indexed(self, scope: Hashable) -> set[StoreKey]:
        """The segments that windows of ``scope``'s table point at."""
        table = self._windows.get(scope, {})
        entries = (e for v in table.values() for e in ([v] if isinstance(v, int) else v))
        return {self._keys[e >> 32] for e in entries}

    def hits(self, scope: Hashable, h: int) -> list[tuple[StoreKey, int]]:
        """(key, offset) of every indexed window of ``scope`` with hash ``h``."""
        found = self._windows.get(scope, {}).get(h)
        entries = () if found is None else (found,) if isinstance(found, int) else found
        return [(self._keys[e >> 32], e & 0xFFFFFFFF) for e in entries]

    def clear(self) -> None:
        self._windows.clear()
        self._ids.clear()
        self._keys.clear()


def match_indexed(
    index: WindowIndex, scope: Hashable, tokens: Sequence[int], min_len: int, lookup: Any
) -> list[Match]:
    """``greedy_matches`` of ``tokens`` over ``index``'s windows of ``scope``; ``lookup(key)``
    gives the segment (or anything with ``.tokens``) an indexed key stands for."""
    if min_len < MIN_MATCH:
        raise ValueError(f"min_len must be >= {MIN_MATCH} (the indexed window)")
    query = tuple(tokens)
    hashes = window_hashes(query)

    def candidates(i: int) -> list[tuple[Any, int]]:
        return [(lookup(key), off) for key, off in index.hits(scope, hashes[i])]

    return greedy_matches(query, candidates, min_len)


class LRUSegmentStore(SegmentStore):
    """In-memory store with a byte budget, evicting the least recently used segment first."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = int(budget_bytes)
        self._items: OrderedDict[StoreKey, StoredSegment] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.evictions = 0
        self._index = WindowIndex()

    @property
    def index(self) -> WindowIndex:
        """The window index over the stored segments (read it under no lock of your own)."""
        return self._index

    def stored(self) -> list[StoredSegment]:
        """The stored segments, least recently used first."""
        with self._lock:
            return list(self._items.values())

    def put(
        self, segment: StoredSegment, user: User = (None, None), readers: Iterable[str] = ()
    ) -> bool:
        with self._lock:
            if segment.key in self._items:
                self._items.move_to_end(segment.key)
                return True
            if segment.nbytes > self.budget_bytes:
                return False
            while self._bytes + segment.nbytes > self.budget_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.nbytes
                self._index.remove(old.key, old.tokens)
                self.evictions += 1
            self._items[segment.key] = segment
            self._bytes += segment.nbytes
            self._index.add(segment.key, segment.tokens)
            return True

    def get(
        self, scope: Hashable, content_hash: str, tokens: Sequence[int]
    ) -> StoredSegment | None:
        with self._lock:
            seg = self._items.get((scope, content_hash))
            if seg is None or seg.tokens != tuple(tokens):
                return None
            self._items.move_to_end(seg.key)
            return seg

    def match(
        self, scope: Hashable, tokens: Sequence[int], min_len: int = MIN_MATCH
    ) -> list[Match]:
        with self._lock:
            found = match_indexed(self._index, scope, tokens, min_len, self._items.__getitem__)
            for m in found:
                self._items.move_to_end(m.segment.key)
            return found

    def __contains__(self, key: StoreKey) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    @property
    def bytes_used(self) -> int:
        return self._bytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._index.clear()
            self._bytes = 0
