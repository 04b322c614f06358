"""TieredStore over memory tiers: demotion, promotion, priority, leases, prefetch, counters."""

from __future__ import annotations

import random
import time

import pytest
import torch

from kvshare.store.segments import LRUSegmentStore
from kvshare.store.tiered import TieredStore
from kvshare.store.tiers import MemoryTier, NullTier

from factories import TOKEN_BYTES, run_threads, seg


def stack(device_tokens: int, host_tokens: int, priority=None) -> TieredStore:
    tiers = [MemoryTier("device", "cpu", device_tokens * TOKEN_BYTES)]
    if host_tokens:
        tiers.append(MemoryTier("host", "cpu", host_tokens * TOKEN_BYTES))
    return TieredStore(tiers, priority)


def segs(n: int, length: int = 20, base: int = 1000) -> list:
    return [seg(range(base + 100 * i, base + 100 * i + length)) for i in range(n)]


def test_full_device_tier_demotes_the_least_recently_used_then_promotes_on_demand():
    store = stack(40, 100)
    a, b, c = segs(3)
    assert store.put(a) and store.put(b)
    assert store.get("t:", a.content_hash, a.tokens) is not None  # b is now the LRU
    assert store.put(c)
    assert store.tier_of(b.key) == "host" and store.tier_of(a.key) == "device"
    got = store.get("t:", b.content_hash, b.tokens)
    assert got is not None and torch.equal(got.kv.keys, b.kv.keys)  # bit-exact round trip
    assert store.tier_of(b.key) == "device" and store.demand_misses["host"] == 1
    assert store.moves[("device", "host")] == 2 and store.moves[("host", "device")] == 1
    assert store.moved_bytes[("device", "host")] == 2 * 20 * TOKEN_BYTES
    assert store.bytes_used <= store.budget_bytes and store.evictions == 0


def test_the_bottom_tier_evicts_and_an_evicted_segment_is_gone_from_matching():
    store = stack(20, 20)
    a, b, c = segs(3)
    for s in (a, b, c):
        assert store.put(s)
    assert a.key not in store and store.evictions == 1
    assert store.match("t:", a.tokens) == [] and len(store.match("t:", b.tokens)) == 1
    assert store.tier_of(b.key) == "device" and store.tier_of(c.key) == "host"  # a swap
    kinds = [e.kind for e in store.events]
    assert kinds.count("evict") == 1 and kinds.count("demote") == 3
    store.used_by([b.key, c.key], ("s", "x"))
    store.put(seg(range(7000, 7020)))
    store.put(seg(range(8000, 8020)))  # b and c go down and out
    assert set(store.keys_used_by([("s", "x")])) == {k for k in (b.key, c.key) if k in store}


def test_single_tier_lru_equals_the_lru_store_on_a_random_trace():
    rng = random.Random(0)
    pool = segs(12, length=16)
    tiered, lru = stack(64, 0), LRUSegmentStore(64 * TOKEN_BYTES)
    for _ in range(300):
        s = rng.choice(pool)
        if rng.random() < 0.5:
            assert tiered.put(s) == lru.put(s)
        else:
            a = tiered.get("t:", s.content_hash, s.tokens)
            b = lru.get("t:", s.content_hash, s.tokens)
            assert (a is None) == (b is None)
        assert {x.key for x in pool if x.key in tiered} == {x.key for x in pool if x.key in lru}


def test_priority_keeps_the_next_agents_segment_and_demotes_a_released_one():
    steps = {"next": 1, "later": 5, "released": float("inf")}

    def priority(users, tick):  # evict first: largest steps, then least recently used
        best = min((steps.get(agent, float("inf")) for _, agent in users), default=float("inf"))
        return (-best, tick)

    store = stack(40, 100, priority)
    nxt, gone, new = segs(3)
    store.put(nxt)
    store.used_by([nxt.key], ("s", "next"))
    store.put(gone)  # more recent than nxt: plain LRU would demote nxt
    store.used_by([gone.key], ("s", "released"))
    store.put(new)
    store.used_by([new.key], ("s", "later"))
    assert store.tier_of(nxt.key) == "device" and store.tier_of(gone.key) == "host"


def test_a_matched_segment_is_leased_until_released():
    store = stack(40, 100)
    a, b, c = segs(3)
    store.put(a)
    store.put(b)
    found = store.match("t:", a.tokens)  # a is leased now
    assert len(found) == 1 and torch.equal(found[0].segment.kv.values, a.kv.values)
    store.get("t:", b.content_hash, b.tokens)  # b more recent: a would be the LRU victim
    store.put(c)
    assert store.tier_of(a.key) == "device" and store.tier_of(b.key) == "host"
    store.release([a.key])
    store.put(seg(range(9000, 9020)))
    assert store.tier_of(a.key) == "host"  # movable once released


def test_match_across_tiers_returns_top_tier_kv_and_counts_the_miss():
    store = stack(20, 100)
    a, b = segs(2)
    store.put(a)
    store.put(b)  # a demoted
    query = (7, 7, *a.tokens[2:18], 8)
    found = store.match("t:", query)
    assert [(m.start, m.length, m.offset) for m in found] == [(2, 16, 2)]
    assert store.tier_of(a.key) == "device" and store.demand_misses["host"] == 1
    store.release([a.key])


def test_prefetch_promotes_only_over_lower_priority_segments():
    rank = {"keep": 2, "low": 0, "mid": 1}

    def priority(users, tick):
        return (max((rank[a] for _, a in users), default=-1), tick)

    store = stack(20, 100, priority)
    low, keep = segs(2)
    store.put(low)
    store.used_by([low.key], ("s", "low"))
    store.put(keep)
    store.used_by([keep.key], ("s", "keep"))  # low was demoted when keep came in
    assert store.tier_of(low.key) == "host"
    assert store.prefetch([low.key]) == 0  # would displace keep, which ranks higher
    store.used_by([low.key], ("s", "mid"))
    store.used_by([keep.key], ("s", "low"))
    rank["keep"] = -2  # keep's agents will not run again
    assert store.prefetch([low.key]) == 1
    assert store.tier_of(low.key) == "device" and store.tier_of(keep.key) == "host"
    assert [e.kind for e in store.events][-1] == "prefetch"


def test_oversized_segments_go_to_a_lower_tier_or_are_refused():
    store = stack(10, 30)
    big = segs(1, length=20)[0]
    assert store.put(big) and store.tier_of(big.key) == "host"
    assert not stack(10, 0).put(big)
    assert not TieredStore([NullTier()]).put(big)


def test_concurrent_puts_matches_and_prefetches_keep_every_invariant():
    store = stack(60, 120)
    pool = segs(16, length=16)

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(150):
            s = rng.choice(pool)
            op = rng.random()
            if op < 0.4:
                store.put(s)
            elif op < 0.8:
                found = store.match("t:", s.tokens)
                for m in found:
                    assert m.segment.tokens[m.offset : m.offset + m.length] == tuple(
                        s.tokens[m.start : m.start + m.length]
                    )
                store.release([m.segment.key for m in found])
            else:
                store.prefetch([s.key])

    assert run_threads(worker) == []
    where = store.placement()
    for tier in store.tiers:
        assert tier.bytes_used <= tier.budget_bytes
        assert tier.bytes_used == sum(n for name, n in where.values() if name == tier.name)
    assert store.leased == 0
    placed = [k for t in store.tiers for k in t.keys()]  # noqa: SIM118 (a tier is no dict)
    assert sorted(placed, key=str) == sorted(where, key=str)  # each in exactly one tier


def test_a_tiered_store_needs_a_tier():
    with pytest.raises(ValueError):
        TieredStore([])


class SlowTier(MemoryTier):
    """A lower tier whose loads take ``delay`` seconds (a disk stand-in)."""

    delay = 0.1

    def get(self, key, tokens):
        time.sleep(self.delay)
        return super().get(key, tokens)


def test_a_demand_load_preempts_a_prefetch_after_at_most_one_segment():
    from kvshare.sched.prefetch import Prefetcher

    slow = SlowTier("disk", "cpu", 1000 * TOKEN_BYTES)
    wanted, other = segs(12), segs(1, base=50_000)[0]
    for s in (*wanted, other):
        slow.put(s)
    store = TieredStore([MemoryTier("device", "cpu", 1000 * TOKEN_BYTES), slow])
    assert all(store.tier_of(s.key) == "disk" for s in wanted)  # adopted from the tier
    store.used_by([s.key for s in wanted], ("s", "next"))
    prefetcher = Prefetcher(store)
    prefetcher.request("s", [("s", "next")])
    deadline = time.monotonic() + 5
    while prefetcher.promoted < 1 and time.monotonic() < deadline:  # the worker has begun
        time.sleep(0.005)
    got = store.get(other.scope, other.content_hash, other.tokens)
    # served between two prefetched segments, not after the whole prefetch
    assert got is not None and prefetcher.promoted < len(wanted) - 2
    assert prefetcher.drain() and prefetcher.promoted == len(wanted)
    assert store.demand_misses["disk"] == 1
    prefetcher.close()


def test_a_demand_miss_reads_the_lower_tier_once():
    class Counting(MemoryTier):
        reads = 0

        def get(self, key, tokens):
            Counting.reads += 1
            return super().get(key, tokens)

    below = Counting("disk", "cpu", 100 * TOKEN_BYTES)
    a = segs(1)[0]
    below.put(a)
    store = TieredStore([MemoryTier("device", "cpu", 100 * TOKEN_BYTES), below])
    assert store.get(a.scope, a.content_hash, a.tokens) is not None
    assert Counting.reads == 1 and store.tier_of(a.key) == "device"


def _steps_priority(steps):
    def priority(users, tick):  # evict first: largest steps, then least recently used
        best = min((steps.get(agent, float("inf")) for _, agent in users), default=float("inf"))
        return (-best, tick)

    return priority


def test_a_new_trace_supersedes_its_writers_older_links_before_making_room():
    """k's new trace holds its whole prompt: k and its reader k1 need it, not k's older
    trace. The stale links are dropped *before* room is made, so the older trace goes first
    (with them it would rank with k1 at 1 step and push out k1's own trace instead)."""
    store = stack(60, 0, _steps_priority({"k": 5, "k1": 1, "k2": 2}))
    old_k, own_k1, own_k2, new_k = segs(4)
    assert store.put(old_k, ("s", "k"), ["k1"])
    assert store.put(own_k1, ("s", "k1"), ["k2"])
    assert store.put(own_k2, ("s", "k2"))
    assert store.put(new_k, ("s", "k"), ["k1"])
    assert old_k.key not in store and {own_k1.key, own_k2.key, new_k.key} <= set(store.placement())
    assert store.keys_used_by([("s", "k")]) == [new_k.key]
    assert set(store.keys_used_by([("s", "k1")])) == {own_k1.key, new_k.key}
    store.record_call([own_k2.key], None, ("s", "k1"))  # no trace kept: exactly what it read
    assert store.keys_used_by([("s", "k1")]) == [own_k2.key]
    store.record_call([], new_k.key, ("s", "k2"))  # a trace put without a user: linked after
    assert store.keys_used_by([("s", "k2")]) == [new_k.key]


class DurableTier(MemoryTier):
    durable = True  # stands for a disk tier (its own tests: test_disk_tier.py)


def test_persist_moves_the_highest_priority_segments_down_to_a_durable_bottom_tier():
    store = TieredStore(
        [
            MemoryTier("device", "cpu", 80 * TOKEN_BYTES),
            DurableTier("disk", "cpu", 40 * TOKEN_BYTES),
        ]
    )
    a, b, c, d = segs(4)
    for s in (a, b, c, d):
        assert store.put(s)
    assert store.get("t:", a.content_hash, a.tokens) is not None  # LRU order now b, c, d, a
    leased = store.match("t:", d.tokens)  # d is being read: it stays where it is
    assert store.persist() == 2  # the disk holds two: a and c (d leased, b sorts first)
    assert [store.tier_of(s.key) for s in (a, b, c, d)] == ["disk", "device", "disk", "device"]
    assert store.moves[("device", "disk")] == 2 and store.evictions == 0
    store.release([m.segment.key for m in leased])
    assert store.persist() == 1  # d displaces c, the one that sorts first on the disk
    assert store.tier_of(d.key) == "disk" and store.tier_of(c.key) is None
    assert stack(40, 40).persist() == 0  # a bottom tier that dies with the process: nothing
