"""``TieredStore``: one segment store over a stack of tiers (device, host, disk).

A segment lives in exactly one tier. ``put`` stores on the top (device) tier, making room by
demoting the segments that sort first by priority one tier down (the bottom tier drops
them: an eviction). A lookup (``get``/``match``) finds a segment in any tier; one found below
the top is a *demand miss*: it is promoted to the top tier before use. ``prefetch`` promotes
ahead of time, displacing only segments that sort before the ones it brings up. Every move
and byte is counted per tier pair, and a bounded timeline of events is kept.

Priority: ``priority(users, last_used)`` returns a sort key, smallest evicted first
(``kvshare.sched.schedule``: steps-to-execution of the agents that use a segment, LRU as
tie-break); ``None`` is plain LRU. Segments matched by a call are *leased* until the call
releases them (``release``): a leased segment is never moved or freed.

Users (who uses which segment, ``kvshare.store.uses``): ``put`` with a user drops the links its new
trace supersedes *before* it makes room; ``record_call`` records a finished call.

This module owns the store's public operations and ``build_tiers``; the per-segment state and
its upkeep: ``kvshare.store.tier_book``; the moves between tiers: ``kvshare.store.tier_moves``.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from kvshare.store import write_later
from kvshare.store.contract import MIN_MATCH, Match, SegmentStore, StoredSegment, StoreKey, User
from kvshare.store.segments import match_indexed
from kvshare.store.tier_book import Priority, TierEntry
from kvshare.store.tier_moves import TierMoves
from kvshare.store.tiers import KVTier

SHARED_CANDIDATES = 4  # segments a local miss may adopt from the shared tier


def scheduler_priority(scheduler: Any) -> Priority:
    """A scheduler's priority over the (session, agent) users that have both ids."""

    def rank(users: Iterable[User], tick: int) -> tuple[Any, ...]:
        known = [(s, a) for s, a in users if s is not None and a is not None]
        return tuple(scheduler.priority(known, tick))

    return rank


class TieredStore(TierMoves, SegmentStore):
    """Segments over ``tiers`` (fastest first; ``tiers[0]`` is where calls read KV).
    Its state and constructor (tiers, priority, pinned, events, trim): ``kvshare.store.
    tier_book``; its moves: ``kvshare.store.tier_moves``."""

    # --- SegmentStore --------------------------------------------------------------------

    def put(
        self,
        segment: StoredSegment,
        user: User = (None, None),
        readers: Iterable[str] = (),
        share: bool = True,
    ) -> bool:
        """Store ``segment`` (see ``SegmentStore.put``); a new one is also written through
        to the shared tier, if any, unless ``share`` is False (it came from there)."""
        new = segment.key not in self
        stored = self._put_local(segment, user, tuple(readers))
        shared = self.shared
        if stored and new and share and shared is not None:  # outside the lock; never raises
            write_later.write(lambda: shared.put(segment))  # for the service
        return stored

    def _put_local(self, segment: StoredSegment, user: User, readers: tuple[str, ...]) -> bool:
        with self._lock:
            e = self._entries.get(segment.key)
            if e is not None:
                self._touch(e)
                self._uses.written(e, user, readers)
                return True
            self._uses.retire(user, readers)  # before making room: see kvshare.store.uses
            e = TierEntry(segment.key, segment.tokens, segment.nbytes, 0, 0)
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
        tier and *leased* until :meth:`release` (the caller's, once it has read the KV). On a
        local miss (at least ``2 * MIN_MATCH`` tokens no local run covers) the shared tier's
        verified candidates of ``scope`` are adopted first (at most ``SHARED_CANDIDATES``)."""
        with self._demand():
            found = match_indexed(self._index, scope, tokens, min_len, self._entries.__getitem__)
            covered = sum(m.length for m in found)
            if self.shared is None or len(tokens) - covered < 2 * MIN_MATCH:
                return self._lease(found)
            have = set(self._entries)
        self._adopt_shared(scope, tokens, have)  # outside the lock: puts take it
        with self._demand():
            return self._lease(
                match_indexed(self._index, scope, tokens, min_len, self._entries.__getitem__)
            )

    def _lease(self, found: Sequence[Match]) -> list[Match]:
        """Resolve and lease the segments of ``found`` (lock held)."""
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

    def _adopt_shared(self, scope: Hashable, tokens: Sequence[int], have: set[StoreKey]) -> None:
        """Adopt the shared tier's verified candidates of ``scope`` for ``tokens`` (``have``:
        the keys held here already)."""
        assert self.shared is not None
        for seg in self.shared.candidates(scope, tokens, SHARED_CANDIDATES, have):
            if seg.scope == scope and self.put(seg, share=False):
                self.adopted += 1

    def release(self, keys: Iterable[StoreKey]) -> None:
        """End the leases that :meth:`match` took on ``keys``."""
        with self._lock:
            for key in keys:
                self._unlease(key)

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
        token ids (how much of its last trace it reads again). The rules: ``kvshare.store.uses``."""
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

    def persist(self) -> int:
        """Move every unleased segment above a durable bottom tier (a disk tier) down to it,
        highest priority first, each displacing only segments that sort before it (for a
        drain: the next process adopts the disk tier); writes behind are flushed before it
        returns. Returns the segments moved (0 without a durable bottom tier)."""
        bottom = len(self.tiers) - 1
        if not bottom or not self.tiers[bottom].durable:
            return 0
        moved = 0
        with self._lock:
            upper = [
                e for e in self._entries.values() if e.tier < bottom and not self._leases[e.key]
            ]
            for e in sorted(upper, key=self._rank, reverse=True):
                seg, src = self.tiers[e.tier].get(e.key, e.tokens), e.tier
                if seg is None or not self._make_room(bottom, e.nbytes, self._rank(e)):
                    continue
                if self.tiers[bottom].put(seg):
                    self.tiers[src].remove(e.key)
                    e.tier = bottom
                    self._event("persist", e, src, bottom)
                    moved += 1
        flush = getattr(self.tiers[bottom], "flush", None)
        if flush is not None:
            flush()
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
    from kvshare.store.tiers import MemoryTier

    tiers: list[KVTier] = [MemoryTier("device", device, device_bytes)]
    if cfg.host_tier_bytes:
        tiers.append(MemoryTier("host", "cpu", cfg.host_tier_bytes))
    if cfg.disk_tier_dir is not None:
        from kvshare.store.disk import DiskTier
        from kvshare.store.identity import KVIdentity

        identity, on_cpu = KVIdentity.of(model), torch.device(device).type == "cpu"
        behind = 0 if on_cpu else cfg.disk_write_behind_bytes
        disk = DiskTier(cfg.disk_tier_dir, cfg.disk_tier_bytes, identity, behind, cfg.disk_key_file)
        tiers.append(disk)
    return tiers
