"""Cache-affinity choice over a changing set of named replicas: a live router's pure half.

A live deployment's replicas come and go by id (one that dies is replaced by a new id), while
:class:`~kvshare.sched.routing.TwoChoiceAffinity` routes over fixed indices on a hash ring.
:class:`ReplicaSlots` gives every live id a slot (an index): a new id takes the lowest free
slot, a dead replica's first, so the ring stays put and only a dead replica's keys move (to
their second choice while its slot is empty, back when a replacement takes the slot).
:class:`AffinityChooser` ranks the live ids for a key: the two-choice pick, then the key's
other candidate, then the rest by load. No I/O and no Ray: ``kvshare.serve.ray_router`` wraps
it as Ray Serve's request router.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping

from kvshare.sched.routing import TwoChoiceAffinity


class ReplicaSlots:
    """Stable slots for replica ids. Contract: after ``update(ids)`` exactly the ids given
    hold slots; an id keeps its slot while it stays; a new id takes the lowest free slot."""

    def __init__(self) -> None:
        self._slot: dict[str, int] = {}

    def update(self, ids: Iterable[str]) -> None:
        """The live ids now (the others lose their slots)."""
        live = set(ids)
        self._slot = {i: s for i, s in self._slot.items() if i in live}
        used = set(self._slot.values())
        free = (s for s in itertools.count() if s not in used)
        for new in sorted(live - set(self._slot)):
            self._slot[new] = next(free)

    def slot(self, replica: str) -> int | None:
        return self._slot.get(replica)

    def owners(self) -> list[str | None]:
        """The id in each slot, ``None`` for an empty one (length: the highest slot + 1)."""
        table: list[str | None] = [None] * (max(self._slot.values(), default=-1) + 1)
        for replica, s in self._slot.items():
            table[s] = replica
        return table


class AffinityChooser:
    """Ranks live replica ids for an affinity key with :class:`TwoChoiceAffinity` over their
    slots. ``threshold``: the load gap (requests) past which a known key leaves its replica;
    ``vnodes``: ring points per slot; ``remember``: keys whose last replica is kept (LRU)."""

    def __init__(self, threshold: int = 1, vnodes: int = 64, remember: int = 1 << 16) -> None:
        self._slots = ReplicaSlots()
        self._policy = TwoChoiceAffinity(1, threshold, vnodes, remember)

    def rank(self, key: str, live: Iterable[str], loads: Mapping[str, int]) -> list[str]:
        """Every id in ``live``, best first: the key's two-choice pick, its other candidate,
        then the rest least loaded first. ``loads[id]``: requests queued or running there
        (missing: 0). Empty when ``live`` is."""
        self._slots.update(live)
        owners = self._slots.owners()
        if not owners:
            return []
        if len(owners) > self._policy.replicas:
            self._policy = self._policy.grown(len(owners))
        size = self._policy.replicas
        alive = [s < len(owners) and owners[s] is not None for s in range(size)]
        load = [loads.get(owners[s] or "", 0) if alive[s] else 0 for s in range(size)]
        pick = self._policy.choose(key, load, alive)
        other = [s for s in self._policy.candidates(key, alive, 2) if s != pick]
        first = [owners[s] for s in (pick, *other)]
        rest = sorted(
            (o for o in owners if o is not None and o not in first), key=lambda o: loads.get(o, 0)
        )
        return [o for o in first if o is not None] + rest

    def settle(self, key: str, replica: str) -> None:
        """``key`` really went to ``replica`` (e.g. the pick refused it): prefer it next."""
        slot = self._slots.slot(replica)
        if slot is not None:
            self._policy.settle(key, slot)
