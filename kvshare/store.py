"""Content-addressed store of message and reply KV segments at canonical positions."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from kvshare.kernels import KV

StoreKey = tuple[str, str]  # (scope, content hash)


@dataclass(frozen=True)
class StoredSegment:
    """KV of one segment, keys rotated to canonical positions ``[0, n)``.

    scope: sharing scope it belongs to (reuse never crosses scopes).
    tokens: the n token ids (every hit is verified against them token by token).
    kv: KV [L, H, n, D] at positions 0..n-1.
    kind: ``prompt`` (computed in a prefill) or ``reply`` (decode-phase KV of a generated reply).
    agent, source_start: who computed it and at which position it started there.
    """

    scope: str
    content_hash: str
    tokens: tuple[int, ...]
    kv: KV
    kind: str
    role: str
    agent: str | None
    source_start: int

    @property
    def key(self) -> StoreKey:
        return (self.scope, self.content_hash)

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes


class SegmentStore(ABC):
    """Contract of a segment store.

    - ``bytes_used <= budget_bytes`` after every call.
    - ``put`` never stores a segment larger than the budget (returns False) and may evict
      others to make room; a key already present is refreshed, not replaced.
    - ``get`` returns a segment only if its scope and hash match *and* its tokens equal
      ``tokens`` exactly; it never returns another scope's segment.
    - Thread-safe.
    """

    budget_bytes: int

    @abstractmethod
    def put(self, segment: StoredSegment) -> bool: ...

    @abstractmethod
    def get(self, scope: str, content_hash: str, tokens: Sequence[int]) -> StoredSegment | None: ...

    @abstractmethod
    def __contains__(self, key: StoreKey) -> bool: ...

    @abstractmethod
    def __len__(self) -> int: ...

    @property
    @abstractmethod
    def bytes_used(self) -> int: ...

    @abstractmethod
    def clear(self) -> None: ...


class NullSegmentStore(SegmentStore):
    """Stores nothing (the naive implementation; every lookup misses)."""

    budget_bytes = 0

    def put(self, segment: StoredSegment) -> bool:
        return False

    def get(self, scope: str, content_hash: str, tokens: Sequence[int]) -> StoredSegment | None:
        return None

    def __contains__(self, key: StoreKey) -> bool:
        return False

    def __len__(self) -> int:
        return 0

    @property
    def bytes_used(self) -> int:
        return 0

    def clear(self) -> None:
        pass


class LRUSegmentStore(SegmentStore):
    """In-memory store with a byte budget, evicting the least recently used segment first."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = int(budget_bytes)
        self._items: OrderedDict[StoreKey, StoredSegment] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.evictions = 0

    def put(self, segment: StoredSegment) -> bool:
        with self._lock:
            if segment.key in self._items:
                self._items.move_to_end(segment.key)
                return True
            if segment.nbytes > self.budget_bytes:
                return False
            while self._bytes + segment.nbytes > self.budget_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.nbytes
                self.evictions += 1
            self._items[segment.key] = segment
            self._bytes += segment.nbytes
            return True

    def get(self, scope: str, content_hash: str, tokens: Sequence[int]) -> StoredSegment | None:
        with self._lock:
            seg = self._items.get((scope, content_hash))
            if seg is None or seg.tokens != tuple(tokens):
                return None
            self._items.move_to_end(seg.key)
            return seg

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
            self._bytes = 0
