"""``TieredStore``: one segment store over a stack of tiers (device, host, disk).

A segment lives in exactly one tier. ``put`` stores on the top (device) tier, making room by
demoting the segments that sort first by priority one tier down (the bottom tier drops
them: an eviction). A lookup (``get``/``match``) finds a segment in any tier; one found below
the top is a *demand miss*: it is promoted to the top tier before use. ``prefetch`` promotes
ahead of time, displacing only segments that sort before the ones it brings up. Every move
and byte is counted per tier pair, and a bounded timeline of events is kept.

Priority: ``priority(users, last_used)`` returns a sort key, smallest evicted first
(``kvshare.schedule``: steps-to-execution of the agents that use a segment, LRU as
tie-break); ``None`` is plain LRU. Segments matched by a call are *leased* until the call
releases them (``release``): a leased segment is never moved or freed.

Users (who uses which segment, ``kvshare.uses``): ``put`` with a user drops the links its new
trace supersedes *before* it makes room; ``record_call`` records a finished call.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from kvshare.store import (
    MIN_MATCH,
    Match,
    SegmentStore,
    StoredSegment,
    StoreKey,
    User,
    WindowIndex,
    match_indexed,
)
from kvshare.tiers import KVTier, kv_to
from kvshare.trim import cut
from kvshare.uses import Uses

Priority = Callable[[Iterable[User], int], tuple[Any, ...]]
Pinned = Callable[[Iterable[Any]], frozenset[Any]]  # SegmentInfos -> keys kept on top


def scheduler_priority(scheduler: Any) -> Priority:
    """A scheduler's priority over the (session, agent) users that have both ids."""

    def rank(users: Iterable[User], tick: int) -> tuple[Any, ...]:
        known = [(s, a) for s, a in users if s is not None and a is not None]
        return tuple(scheduler.priority(known, tick))

    return rank


@dataclass
class _Entry:
    """Where one segment lives and who uses it (tokens kept for matching in any tier)."""

    key: StoreKey
    tokens: tuple[int, ...]
    nbytes: int
    tier: int
    tick: int
    users: set[User] = field(default_factory=set)
    writer: User | None = None  # whose call computed it (None: unknown, e.g. adopted)
    cut: bool = False  # a head cut from a trace (``kvshare.trim``)


@dataclass(frozen=True)
class TierEvent:
    """One timeline event: ``kind`` in put/hit/miss/promote/demote/evict/prefetch."""

    at: float
    kind: str
    key: StoreKey
    src: str | None
    dst: str | None
    nbytes: int


class TieredStore(SegmentStore):
    """Segments over ``tiers`` (fastest first; ``tiers[0]`` is where calls read KV)."""

    def __init__(
        self,
        tiers: Sequence[KVTier],
        priority: Priority | None = None,
        pinned: Pinned | None = None,
        events: int = 10_000,
        trim: bool = False,
    ) -> None:
        if not tiers:
            raise ValueError("a TieredStore needs at least one tier")
        self.tiers = list(tiers)
        self.budget_bytes = self.tiers[0].budget_bytes
        self.priority: Priority = priority or (lambda users, tick: (tick,))
        self.pinned = pinned
        self.trim = trim
        self.trims = 0
        self._entries: dict[StoreKey, _Entry] = {}
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
                    self._entries[key] = _Entry(key, tokens, nbytes, t, 0)
                    self._index.add(key, tokens)

    # --- bookkeeping -------------------------------------------------------------------

    def _event(self, kind: str, e: _Entry, src: int | None, dst: int | None) -> None:
        a = None if src is None else self.tiers[src].name
        b = None if dst is None else self.tiers[dst].name
        self.events.append(TierEvent(time.monotonic(), kind, e.key, a, b, e.nbytes))
        if src is not None and dst is not None:
            pair = (self.tiers[src].name, self.tiers[dst].name)
            self.moves[pair] += 1
            self.moved_bytes[pair] += e.nbytes

    def _touch(self, e: _Entry) -> None:
        self._tick += 1
        e.tick = self._tick

    def _rank(self, e: _Entry) -> tuple[Any, ...]:
        return self.priority(e.users, e.tick)

    def _pinned(self) -> frozenset[Any]:
        """Keys kept on the top tier whatever their priority: heads cut from traces that
        several agents use (a system prompt or tool block they share), as many as the pin
        cap holds (``pinned``). A whole trace is never pinned: its writer and readers are
        several agents, but each of them uses a different part of it."""
        if self.pinned is None:
            return frozenset()
        from kvshare.schedule import SegmentInfo

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

    def _drop(self, e: _Entry) -> None:
        self.tiers[e.tier].remove(e.key)
        self._forget(e)

    def _forget(self, e: _Entry) -> None:
        """Drop ``e`` from the index, the entries and its users' sets (no tier touched)."""
        self._index.remove(e.key, e.tokens)
        del self._entries[e.key]
        self._uses.forget(e)

    # --- moving ------------------------------------------------------------------------

    def _make_room(self, t: int, nbytes: int, keep: tuple[Any, ...] | None = None) -> bool:
        """Free ``nbytes`` on tier ``t`` by demoting its lowest-priority unleased, unpinned
        segments (only those that sort before ``keep``, when given); with ``trim``, a trace
        only its writer still needs is cut to its head first (``kvshare.trim``)."""
        tier = self.tiers[t]
        if nbytes > tier.budget_bytes:
            return False
        pinned = self._pinned() if t == 0 else frozenset()
        while tier.free_bytes() < nbytes:
            movable = [
                e
                for e in self._entries.values()
                if e.tier == t and not self._leases[e.key] and e.key not in pinned
            ]
            if not movable:
                return False
            victim = min(movable, key=self._victim_rank)
            if keep is not None and self._victim_rank(victim) >= keep:
                return False
            if not (self._cuttable(victim) and self._cut(victim)):
                self._demote(victim)
        return True

    def _cuttable(self, e: _Entry) -> bool:
        """Whether ``e`` is a trace only its writer still needs, and that writer was seen
        reading a head of its own last trace (``record_call``) shorter than ``e``."""
        if not self.trim or e.cut or e.writer is None or e.users != {e.writer}:
            return False
        return 0 < self._uses.heads.get(e.writer, 0) < len(e.tokens)

    def _victim_rank(self, e: _Entry) -> tuple[Any, ...]:
        """Eviction order: a cuttable trace's tail is needed by no one (first out)."""
        return self.priority((), e.tick) if self._cuttable(e) else self._rank(e)

    def _cut(self, e: _Entry) -> bool:
        """Keep ``e``'s head on its tier (the writer's link moves to it) and send the whole
        trace down a tier like any victim (out, from the bottom tier): with a tier below
        nothing is lost. False when its KV could not be read."""
        seg = self.tiers[e.tier].get(e.key, e.tokens)
        if seg is None:
            return False
        writer = e.writer
        head, tier = cut(seg, self._uses.heads[writer] if writer else 0), e.tier
        if writer is not None:
            self._uses.unlink(e, writer)
        self._event("trim", e, tier, None)
        self.trims += 1
        self._demote(e, seg)
        h = self._entries.get(head.key)
        users: set[User] = {writer} if writer is not None else set()
        if h is not None and h.tier > tier and not self._leases[h.key]:
            users |= h.users  # the same head went down earlier: this copy takes its place
            self._drop(h)
            h = None
        if h is None and self.tiers[tier].put(head):  # smaller than what went down
            h = _Entry(head.key, head.tokens, head.nbytes, tier, e.tick, writer=writer, cut=True)
            self._entries[h.key] = h
            self._index.add(h.key, h.tokens)
            self._event("put", h, None, tier)
        if h is not None:
            for user in users:
                self._uses.link(h, user)
        return True

    def _demote(self, e: _Entry, seg: StoredSegment | None = None) -> None:
        """Move ``e`` one tier down (``seg``: its segment, when the caller read it already);
        out of the store from the bottom tier, or when the tier below has no room."""
        src, dst = e.tier, e.tier + 1
        if dst < len(self.tiers) and seg is None:  # nothing is read to drop it from the bottom
            seg = self.tiers[src].get(e.key, e.tokens)
        room = seg is not None and dst < len(self.tiers) and self._make_room(dst, e.nbytes)
        if room and seg is not None and self.tiers[dst].put(seg):
            self.tiers[src].remove(e.key)
            e.tier = dst
            self._event("demote", e, src, dst)
            return
        self._event("evict", e, src, None)
        self.evictions += 1
        self._drop(e)

    def _load(self, e: _Entry) -> StoredSegment | None:
        """``e``'s segment from its tier (one read; a disk tier verifies it); a segment lost
        below (a corrupt file) is a miss, and forgotten."""
        seg = self.tiers[e.tier].get(e.key, e.tokens)
        if seg is None:
            self._drop(e)
        return seg

    def _promote(
        self, e: _Entry, seg: StoredSegment, kind: str, keep: tuple[Any, ...] | None = None
    ) -> bool:
        """Move ``e`` (``seg``, read from its tier) up to the top tier. Its copy below is taken
        out first, so the room it frees can take what the top tier demotes (a swap); put back
        when the top tier cannot make room (evicted if even that fails)."""
        src = e.tier
        self.tiers[src].remove(e.key)
        self._leases[e.key] += 1  # in flight: no demotion may pick it
        try:
            moved = self._make_room(0, e.nbytes, keep) and self.tiers[0].put(seg)
        finally:
            self._unlease(e.key)
        if moved:
            e.tier = 0
            self._event(kind, e, src, 0)
            return True
        if not self.tiers[src].put(seg):
            self._event("evict", e, src, None)
            self.evictions += 1
            self._forget(e)
        return False

    def _resolve(self, e: _Entry) -> StoredSegment | None:
        """The segment with its KV on the top tier's device (promoted on a demand miss;
        copied without storing when the top tier cannot make room)."""
        if e.tier == 0:
            self.hits[self.tiers[0].name] += 1
            return self.tiers[0].get(e.key, e.tokens)
        self.demand_misses[self.tiers[e.tier].name] += 1
        seg = self._load(e)
        if seg is None:
            return None
        if self._promote(e, seg, "promote"):
            return self.tiers[0].get(e.key, e.tokens)
        device = getattr(self.tiers[0], "device", seg.kv.keys.device)
        return replace(seg, kv=kv_to(seg.kv, device))

    # --- SegmentStore --------------------------------------------------------------------

    def put(
        self, segment: StoredSegment, user: User = (None, None), readers: Iterable[str] = ()
    ) -> bool:
        readers = tuple(readers)
        with self._lock:
            e = self._entries.get(segment.key)
            if e is not None:
                self._touch(e)
                self._uses.written(e, user, readers)
                return True
            self._uses.retire(user, readers)  # before making room: see kvshare.uses
            e = _Entry(segment.key, segment.tokens, segment.nbytes, 0, 0)
            self._touch(e)
            for t in range(len(self.tiers)):  # the fastest tier that can hold it
                if self._make_room(t, e.nbytes) and self.tiers[t].put(segment):
                    e.tier = t
                    self._entries[e.key] = e
                    self._index.add(e.key, e.tokens)
                    self._event("put", e, None, t)
                    self._uses.written(e, user, readers)
                    return True
            return False

    @contextmanager
    def _demand(self) -> Iterator[None]:
        """The lock, for a caller's read: ``prefetch`` steps aside between two segments while
        any caller waits for it (a lock is no queue: the prefetch thread would take it again
        at once, so a demand load would wait for the whole prefetch)."""
        with self._gate:
            self._callers += 1
        try:
            with self._lock:
                yield
        finally:
            with self._gate:
                self._callers -= 1
                self._gate.notify_all()

    def get(
        self, scope: Hashable, content_hash: str, tokens: Sequence[int]
    ) -> StoredSegment | None:
        with self._demand():
            e = self._entries.get((scope, content_hash))
            if e is None or e.tokens != tuple(tokens):
                return None
            self._touch(e)
            return self._resolve(e)

    def match(
        self, scope: Hashable, tokens: Sequence[int], min_len: int = MIN_MATCH
    ) -> list[Match]:
        """Verified runs as in every store; each matched segment is resolved onto the top
        tier and *leased* until :meth:`release` (the caller's, once it has read the KV)."""
        with self._demand():
            found = match_indexed(self._index, scope, tokens, min_len, self._entries.__getitem__)
            out = []
            for m in found:
                e = self._entries.get(m.segment.key)
                seg = None if e is None else self._resolve(e)
                if e is None or seg is None:
                    continue
                self._touch(e)
                self._leases[e.key] += 1
                out.append(Match(m.start, m.length, seg, m.offset))
            return out

    def release(self, keys: Iterable[StoreKey]) -> None:
        """End the leases that :meth:`match` took on ``keys``."""
        with self._lock:
            for key in keys:
                self._unlease(key)

    def _unlease(self, key: StoreKey) -> None:
        if self._leases.get(key, 0) > 1:
            self._leases[key] -= 1
        else:
            self._leases.pop(key, None)

    def used_by(self, keys: Iterable[StoreKey], user: User) -> None:
        """Record that ``user`` (session, agent) used these segments (their priority)."""
        with self._lock:
            for key in keys:
                e = self._entries.get(key)
                if e is not None:
                    self._uses.link(e, user)

    def record_call(
        self,
        read: Iterable[StoreKey],
        wrote: StoreKey | None,
        user: User,
        readers: Iterable[str] = (),
        prompt: Sequence[int] = (),
    ) -> None:
        """``user``'s latest call read ``read`` and wrote ``wrote``; ``prompt``: its prompt's
        token ids (how much of its last trace it reads again). The rules: ``kvshare.uses``."""
        with self._lock:
            entry = self._entries.get(wrote) if wrote is not None else None
            self._uses.record(read, entry, user, readers, prompt)

    def prefetch(self, keys: Iterable[StoreKey]) -> int:
        """Promote ``keys`` to the top tier, displacing only segments that sort before each
        one; returns how many moved. Holds the lock per segment, so a demand load waits for
        at most one segment's move."""
        moved = 0
        for key in keys:
            with self._gate:
                self._gate.wait_for(lambda: self._callers == 0)
            with self._lock:
                e = self._entries.get(key)
                if e is None or e.tier == 0:
                    continue
                seg = self._load(e)
                moved += seg is not None and self._promote(e, seg, "prefetch", self._rank(e))
        return moved

    def keys_used_by(self, users: Iterable[User]) -> list[StoreKey]:
        """Keys of the segments any of ``users`` used, highest priority first."""
        with self._lock:
            hit = [self._entries[k] for k in self._uses.keys_of(users)]
            return [e.key for e in sorted(hit, key=self._rank, reverse=True)]

    def placement(self) -> dict[StoreKey, tuple[str, int]]:
        """Every segment's tier and bytes (for checks and reports)."""
        with self._lock:
            return {k: (self.tiers[e.tier].name, e.nbytes) for k, e in self._entries.items()}

    @property
    def leased(self) -> int:
        """Segments leased now (a call is reading them)."""
        with self._lock:
            return len(self._leases)

    def tier_of(self, key: StoreKey) -> str | None:
        with self._lock:
            e = self._entries.get(key)
            return None if e is None else self.tiers[e.tier].name

    def __contains__(self, key: StoreKey) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes_used(self) -> int:
        """Bytes on the top tier (the budget ``budget_bytes`` bounds); per tier:
        :meth:`tier_bytes`."""
        return self.tiers[0].bytes_used

    def tier_bytes(self) -> dict[str, int]:
        return {t.name: t.bytes_used for t in self.tiers}

    def clear(self) -> None:
        with self._lock:
            for t in self.tiers:
                t.clear()
            self._entries.clear()
            self._index.clear()
            self._leases.clear()
            self._uses.clear()


def build_tiers(cfg: Any, device_bytes: int, device: Any, model: Any) -> list[KVTier]:
    """The tiers a ``TiersConfig`` asks for: device (the model's device), then host memory
    (``host_tier_bytes`` > 0), then disk (``disk_tier_dir``, sealed with the key in
    ``disk_key_file``), its files bound to the model's :class:`KVIdentity` (weights and every
    KV-shaping config field) so no other model ever reads them. The disk tier writes behind
    the caller only when the model runs on an accelerator: on a CPU-only engine the writer
    thread (a checksum and a copy per segment) takes cores from the next call (measured on
    one core: remember stage 100-150 -> 15-20 ms, mean TTFT of the next calls +0.03-0.09 s),
    so there the caller writes, after its reply."""
    from kvshare.tiers import MemoryTier

    tiers: list[KVTier] = [MemoryTier("device", device, device_bytes)]
    if cfg.host_tier_bytes:
        tiers.append(MemoryTier("host", "cpu", cfg.host_tier_bytes))
    if cfg.disk_tier_dir is not None:
        from kvshare.disk_tier import DiskTier
        from kvshare.kv_identity import KVIdentity

        identity, on_cpu = KVIdentity.of(model), torch.device(device).type == "cpu"
        behind = 0 if on_cpu else cfg.disk_write_behind_bytes
        disk = DiskTier(cfg.disk_tier_dir, cfg.disk_tier_bytes, identity, behind, cfg.disk_key_file)
        tiers.append(disk)
    return tiers
