"""What a stored segment is and what every segment store promises.

Owns ``StoredSegment`` (KV [L, H, n, D] at canonical positions ``[0, n)``), ``Match``, the key
and user shapes (``StoreKey``: (scope, content hash); ``User``: (session, agent)), ``MIN_MATCH``
and the ``SegmentStore`` contract. The stores themselves: ``kvshare.store.segments``,
``kvshare.store.tiered``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

from kvshare.kernels import KV

StoreKey = tuple[Hashable, str]  # (scope, content hash)
User = tuple[str | None, str | None]  # (session, agent)


@dataclass(frozen=True)
class StoredSegment:
    """KV of one segment, keys rotated to canonical positions ``[0, n)``.

    scope: sharing scope it belongs to (reuse never crosses scopes).
    tokens: the n token ids (every hit is verified against them token by token).
    kv: KV [L, H, n, D] at positions 0..n-1.
    kind: ``prompt`` (computed in a prefill) or ``reply`` (decode-phase KV of a generated reply).
    agent, source_start: who computed it and at which position it started there.
    slot: where it sat in its source: ``m<i>`` for message i of a prompt, ``reply`` for a reply.
    bounds: for a segment spanning several slots (a trace), ``(offset, slot)`` where each slot
        begins, ascending; empty when the whole segment is ``slot``.
    """

    scope: Hashable
    content_hash: str
    tokens: tuple[int, ...]
    kv: KV
    kind: str
    role: str
    agent: str | None
    source_start: int
    slot: str = ""
    bounds: tuple[tuple[int, str], ...] = ()

    def slot_at(self, offset: int) -> str:
        """The slot of the source that token ``offset`` of this segment sat in."""
        found = self.slot
        for start, name in self.bounds:
            if start > offset:
                break
            found = name
        return found

    @property
    def key(self) -> StoreKey:
        return (self.scope, self.content_hash)

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes


@dataclass(frozen=True)
class Match:
    """Query tokens ``[start, start + length)`` equal segment tokens from ``offset`` on."""

    start: int
    length: int
    segment: StoredSegment
    offset: int


MIN_MATCH = 16  # window of the rolling hash: shorter runs are not worth relocating


class SegmentStore(ABC):
    """Contract of a segment store.

    - ``bytes_used <= budget_bytes`` after every call.
    - ``put`` never stores a segment larger than the budget (returns False) and may evict
      others to make room; a key already present is refreshed, not replaced. ``user``: the
      (session, agent) whose call computed it; ``readers``: agents of that session expected
      to read it next (tiered stores rank by them before making room; others ignore them).
    - ``get`` returns a segment only if its scope and hash match *and* its tokens equal
      ``tokens`` exactly; it never returns another scope's segment.
    - Thread-safe.
    """

    budget_bytes: int

    @abstractmethod
    def put(
        self, segment: StoredSegment, user: User = (None, None), readers: Iterable[str] = ()
    ) -> bool: ...

    @abstractmethod
    def get(
        self, scope: Hashable, content_hash: str, tokens: Sequence[int]
    ) -> StoredSegment | None: ...

    @abstractmethod
    def match(
        self, scope: Hashable, tokens: Sequence[int], min_len: int = MIN_MATCH
    ) -> list[Match]:
        """Verified runs of ``tokens`` found inside stored segments of ``scope`` (sub-message
        reuse), left to right, non-overlapping, each at least ``min_len`` tokens."""

    @abstractmethod
    def __contains__(self, key: StoreKey) -> bool: ...

    @abstractmethod
    def __len__(self) -> int: ...

    @property
    @abstractmethod
    def bytes_used(self) -> int: ...

    @abstractmethod
    def clear(self) -> None: ...

    def release(self, keys: Iterable[StoreKey]) -> None:
        """End the leases a ``match`` took on ``keys`` (stores that move KV between tiers
        lease what they hand out; the others have nothing to release)."""
        return None

    def used_by(self, keys: Iterable[StoreKey], user: User) -> None:
        """Record that ``user`` (session, agent) used these segments (tiered stores rank by
        it; the others ignore it)."""
        return None

    def record_call(
        self,
        read: Iterable[StoreKey],
        wrote: StoreKey | None,
        user: User,
        readers: Iterable[str] = (),
        prompt: Sequence[int] = (),
    ) -> None:
        """One finished call of ``user``: it read ``read`` and wrote ``wrote``; ``readers``:
        the agents expected to read what it wrote (its successors); ``prompt``: its prompt's
        token ids. Tiered stores rank by it
        (a user is kept only on what its latest call used); the others ignore it."""
        return None

    def persist(self) -> int:
        """Move what the store holds in memory to a tier that outlives the process (a disk
        tier), so that the next process over it adopts the KV; returns the segments moved.
        Stores without such a tier keep nothing past the process: 0."""
        return 0
