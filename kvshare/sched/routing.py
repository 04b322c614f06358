"""Which replica serves a request, when kvshare runs as several replicas (scale-out).

Reuse lives on the replica that computed the KV, so the agents of one workflow should land
where the earlier agents ran; load wants the opposite, the least busy replica. A
:class:`Router` picks a replica from an affinity key (the workflow or session, and the
hashes of the request's leading segments) and every replica's load (requests queued or
running). The policies, in :data:`ROUTERS`:

- ``round-robin``: replicas in turn (no affinity, even spread).
- ``power-of-two``: the less loaded of two replicas drawn at random (balance, no affinity).
- ``consistent-hash``: the key's first replica on a hash ring (affinity, no balance); a dead
  replica's keys move to the next replica on the ring, the rest stay.
- ``two-choice``: the key's first two replicas on the ring; a new key takes the less loaded,
  a known one stays where it went last unless that replica's load exceeds the other's by
  more than ``threshold`` (affinity first, balance as a brake: the DualMap idea).

Pure Python, no I/O: the routing simulator (``kvshare.bench.routing``) and a live router
share it.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence

from kvshare.errors import ConfigError
from kvshare.registry import Registry


def stable_hash(text: str) -> int:
    """A 64-bit hash of ``text``, the same in every process (unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class Router(ABC):
    """Contract: ``choose(key, loads, alive)`` returns the index of a live replica
    (``alive[i]`` True; all live when ``alive`` is None), ``loads[i]`` being replica i's
    requests queued or running; deterministic given the same calls in the same order."""

    def __init__(self, replicas: int) -> None:
        if replicas < 1:
            raise ConfigError(f"a router needs at least one replica, got {replicas}")
        self.replicas = replicas

    @abstractmethod
    def choose(self, key: str, loads: Sequence[int], alive: Sequence[bool] | None = None) -> int:
        """The replica for a request with affinity ``key``."""

    def _live(self, alive: Sequence[bool] | None) -> list[int]:
        live = [i for i in range(self.replicas) if alive is None or alive[i]]
        if not live:
            raise ConfigError("no replica is alive")
        return live


class RoundRobin(Router):
    """Replicas in turn, skipping dead ones."""

    def __init__(self, replicas: int) -> None:
        super().__init__(replicas)
        self._next = 0

    def choose(self, key: str, loads: Sequence[int], alive: Sequence[bool] | None = None) -> int:
        live = self._live(alive)
        pick = live[self._next % len(live)]
        self._next += 1
        return pick


class PowerOfTwo(Router):
    """The less loaded of two distinct live replicas drawn at random (seeded)."""

    def __init__(self, replicas: int, seed: int = 0) -> None:
        super().__init__(replicas)
        self._rng = random.Random(seed)

    def choose(self, key: str, loads: Sequence[int], alive: Sequence[bool] | None = None) -> int:
        live = self._live(alive)
        if len(live) == 1:
            return live[0]
        a, b = self._rng.sample(live, 2)
        return a if loads[a] <= loads[b] else b


class ConsistentHash(Router):
    """The key's first live replica clockwise on a ring of ``vnodes`` points per replica."""

    def __init__(self, replicas: int, vnodes: int = 64) -> None:
        super().__init__(replicas)
        self._vnodes = vnodes
        points = sorted(
            (stable_hash(f"{r}#{v}"), r) for r in range(replicas) for v in range(vnodes)
        )
        self._ring = [p for p, _ in points]
        self._owner = [r for _, r in points]

    def candidates(self, key: str, alive: Sequence[bool] | None, count: int) -> list[int]:
        """The key's first ``count`` distinct live replicas clockwise (fewer if fewer live)."""
        live = set(self._live(alive))
        start = bisect.bisect(self._ring, stable_hash(key))
        found: list[int] = []
        for i in range(len(self._ring)):
            r = self._owner[(start + i) % len(self._ring)]
            if r in live and r not in found:
                found.append(r)
                if len(found) == min(count, len(live)):
                    break
        return found

    def choose(self, key: str, loads: Sequence[int], alive: Sequence[bool] | None = None) -> int:
        return self.candidates(key, alive, 1)[0]


class TwoChoiceAffinity(ConsistentHash):
    """Of the key's first two replicas on the ring: for a key seen before, the one it went
    to last unless its load exceeds the other's by more than ``threshold`` requests (then
    the other); for a new key, the less loaded. The last choice of up to ``remember`` keys
    is kept (LRU)."""

    def __init__(
        self,
        replicas: int,
        threshold: int = 1,
        vnodes: int = 64,
        remember: int = 1 << 16,
        choices: int = 2,
    ) -> None:
        super().__init__(replicas, vnodes)
        if threshold < 0 or choices < 2:
            raise ConfigError(f"two-choice wants threshold >= 0 and choices >= 2, got "
                              f"{threshold} and {choices}")  # fmt: skip
        self.threshold, self.remember, self.choices = threshold, remember, choices
        self._last: OrderedDict[str, int] = OrderedDict()

    def choose(self, key: str, loads: Sequence[int], alive: Sequence[bool] | None = None) -> int:
        found = self.candidates(key, alive, self.choices)
        least = min(found, key=lambda r: loads[r])
        last = self._last.get(key)
        pick = least  # a new key (or its replica died): nothing to keep, the least loaded
        if last in found and loads[last] - loads[least] <= self.threshold:
            pick = last  # where its KV is, unless that replica is too far behind
        self.settle(key, pick)
        return pick

    def grown(self, replicas: int) -> TwoChoiceAffinity:
        """A copy over ``replicas`` (>= this one's) replicas that remembers the same keys:
        the ring points of the replicas kept do not move, so neither do their keys."""
        if replicas < self.replicas:
            raise ConfigError(f"a router can grow, not shrink: {self.replicas} -> {replicas}")
        other = TwoChoiceAffinity(
            replicas, self.threshold, self._vnodes, self.remember, self.choices
        )
        other._last = OrderedDict(self._last)
        return other

    def settle(self, key: str, replica: int) -> None:
        """Record that ``key`` went to ``replica`` (the choice, or where the caller really
        sent it when that replica refused it): the next call of ``key`` prefers it."""
        self._last[key] = replica
        self._last.move_to_end(key)
        if len(self._last) > self.remember:
            self._last.popitem(last=False)


ROUTERS: Registry[type[Router]] = Registry("router")
ROUTERS.register("round-robin", lambda: RoundRobin)
ROUTERS.register("power-of-two", lambda: PowerOfTwo)
ROUTERS.register("consistent-hash", lambda: ConsistentHash)
ROUTERS.register("two-choice", lambda: TwoChoiceAffinity)
