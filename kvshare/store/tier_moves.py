"""A tiered store's moves: make room, demote, promote, trim, resolve a lookup.

Owns ``TierMoves``: the steps of a ``kvshare.store.tiered.TieredStore`` that move segments
between its tiers (callers hold the store's lock). The state they move: ``kvshare.store.tier_book``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from kvshare.store.contract import StoredSegment, User
from kvshare.store.tier_book import TierBook, TierEntry
from kvshare.store.tiers import kv_to
from kvshare.store.trim import cut


class TierMoves(TierBook):
    """Moves segments between the tiers of a :class:`TierBook`."""

    def _make_room(self, t: int, nbytes: int, keep: tuple[Any, ...] | None = None) -> bool:
        """Free ``nbytes`` on tier ``t`` by demoting its lowest-priority unleased, unpinned
        segments (only those that sort before ``keep``, when given); with ``trim``, a trace
        only its writer still needs is cut to its head first (``kvshare.store.trim``)."""
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

    def _cuttable(self, e: TierEntry) -> bool:
        """Whether ``e`` is a trace only its writer still needs, and that writer was seen
        reading a head of its own last trace (``record_call``) shorter than ``e``."""
        if not self.trim or e.cut or e.writer is None or e.users != {e.writer}:
            return False
        return 0 < self._uses.heads.get(e.writer, 0) < len(e.tokens)

    def _victim_rank(self, e: TierEntry) -> tuple[Any, ...]:
        """Eviction order: a cuttable trace's tail is needed by no one (first out)."""
        return self.priority((), e.tick) if self._cuttable(e) else self._rank(e)

    def _cut(self, e: TierEntry) -> bool:
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
            h = TierEntry(head.key, head.tokens, head.nbytes, tier, e.tick, writer=writer, cut=True)
            self._entries[h.key] = h
            self._index.add(h.key, h.tokens)
            self._event("put", h, None, tier)
        if h is not None:
            for user in users:
                self._uses.link(h, user)
        return True

    def _demote(self, e: TierEntry, seg: StoredSegment | None = None) -> None:
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

    def _load(self, e: TierEntry) -> StoredSegment | None:
        """``e``'s segment from its tier (one read; a disk tier verifies it); a segment lost
        below (a corrupt file) is a miss, and forgotten."""
        seg = self.tiers[e.tier].get(e.key, e.tokens)
        if seg is None:
            self._drop(e)
        return seg

    def _promote(
        self, e: TierEntry, seg: StoredSegment, kind: str, keep: tuple[Any, ...] | None = None
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

    def _resolve(self, e: TierEntry) -> StoredSegment | None:
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
