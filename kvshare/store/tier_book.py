"""A tiered store's bookkeeping: where each segment lives, who uses it, what moved.

Owns ``TierEntry`` (one segment: its tier, tokens, bytes, users), ``TierEvent`` (one timeline
event), the ``Priority``/``Pinned`` callables and ``TierBook``: the state of a
``kvshare.store.tiered.TieredStore`` (entries, window index, leases, counters, timeline) and the
steps that only keep it (touch, rank, pin, forget, unlease). Moves: ``kvshare.store.tier_moves``.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvshare.store.contract import StoreKey, User
from kvshare.store.segments import WindowIndex
from kvshare.store.tiers import KVTier
from kvshare.store.uses import SegmentInfo, Uses

Priority = Callable[[Iterable[User], int], tuple[Any, ...]]
Pinned = Callable[[Iterable[Any]], frozenset[Any]]  # SegmentInfos -> keys kept on top


@dataclass
class TierEntry:
    """Where one segment lives and who uses it (tokens kept for matching in any tier)."""

    key: StoreKey
    tokens: tuple[int, ...]
    nbytes: int
    tier: int
    tick: int
    users: set[User] = field(default_factory=set)
    writer: User | None = None  # whose call computed it (None: unknown, e.g. adopted)
    cut: bool = False  # a head cut from a trace (``kvshare.store.trim``)


@dataclass(frozen=True)
class TierEvent:
    """One timeline event: ``kind`` in put/hit/miss/promote/demote/evict/prefetch."""

    at: float
    kind: str
    key: StoreKey
    src: str | None
    dst: str | None
    nbytes: int


class TierBook:
    """The state of a store over ``tiers`` (fastest first) and the steps that keep it."""

    def __init__(
        self,
        tiers: Sequence[KVTier],
        priority: Priority | None = None,
        pinned: Pinned | None = None,
        events: int = 10_000,
        trim: bool = False,
        shared: Any = None,
    ) -> None:
        if not tiers:
            raise ValueError("a TieredStore needs at least one tier")
        self.tiers = list(tiers)
        self.budget_bytes = self.tiers[0].budget_bytes
        self.priority: Priority = priority or (lambda users, tick: (tick,))
        self.pinned = pinned
        self.trim = trim
        self.trims = 0
        self.shared = shared  # a SharedTier (kvshare.store.shared) or None
        self.adopted = 0  # segments adopted from it
        self._entries: dict[StoreKey, TierEntry] = {}
        self._uses = Uses(self._entries)
        self._index = WindowIndex()
        self._leases: Counter[StoreKey] = Counter()
        self._lock = threading.RLock()
        self._callers = 0  # demand reads waiting for or holding the lock (prefetch yields)
        self._gate = threading.Condition(threading.Lock())
        self._tick = 0
        self.moves: Counter[tuple[str, str]] = Counter()
        self.moved_bytes: Counter[tuple[str, str]] = Counter()
        self.demand_misses: Counter[str] = Counter()
        self.hits: Counter[str] = Counter()
        self.evictions = 0
        self.events: deque[TierEvent] = deque(maxlen=events)
        self._adopt()

    def _adopt(self) -> None:
        """Index what the tiers already hold (a disk tier after a restart), oldest first."""
        for t, tier in enumerate(self.tiers):
            for key, tokens, nbytes in tier.listing():
                if key not in self._entries:
                    self._entries[key] = TierEntry(key, tokens, nbytes, t, 0)
                    self._index.add(key, tokens)

    # --- bookkeeping -------------------------------------------------------------------

    def _event(self, kind: str, e: TierEntry, src: int | None, dst: int | None) -> None:
        a = None if src is None else self.tiers[src].name
        b = None if dst is None else self.tiers[dst].name
        self.events.append(TierEvent(time.monotonic(), kind, e.key, a, b, e.nbytes))
        if src is not None and dst is not None:
            pair = (self.tiers[src].name, self.tiers[dst].name)
            self.moves[pair] += 1
            self.moved_bytes[pair] += e.nbytes

    def _touch(self, e: TierEntry) -> None:
        self._tick += 1
        e.tick = self._tick

    def _rank(self, e: TierEntry) -> tuple[Any, ...]:
        return self.priority(e.users, e.tick)

    def _pinned(self) -> frozenset[Any]:
        """Keys kept on the top tier whatever their priority: heads cut from traces that
        several agents use (a system prompt or tool block they share), as many as the pin
        cap holds (``pinned``). A whole trace is never pinned: its writer and readers are
        several agents, but each of them uses a different part of it."""
        if self.pinned is None:
            return frozenset()
        infos = [
            SegmentInfo(
                e.key,
                e.nbytes,
                [(s, a) for s, a in e.users if s is not None and a is not None],
                e.tick,
                e.cut and len({a for _, a in e.users}) > 1,
            )
            for e in self._entries.values()
            if e.tier == 0
        ]
        return self.pinned(infos)

    def _drop(self, e: TierEntry) -> None:
        self.tiers[e.tier].remove(e.key)
        self._forget(e)

    def _forget(self, e: TierEntry) -> None:
        """Drop ``e`` from the index, the entries and its users' sets (no tier touched)."""
        self._index.remove(e.key, e.tokens)
        del self._entries[e.key]
        self._uses.forget(e)

    def _unlease(self, key: StoreKey) -> None:
        if self._leases.get(key, 0) > 1:
            self._leases[key] -= 1
        else:
            self._leases.pop(key, None)
