"""RedisTier on a real redis-server: bit-exact round trips, the shared index, entries that fail a
check (flipped, truncated, re-checksummed, another model's, another tenant's) never served and
deleted, a server killed, restarted or stalled mid-run, two writers of one key, TTL and
maxmemory."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import torch
from kvshare.anchors import ModelIdentity
from kvshare.kernels import KV

from kvshare.scope import Scope
from kvshare.store.redis_tier import SUM, RedisTier
from kvshare.store.seal import Sealer
from kvshare.store.segments import StoredSegment

IDENTITY = ModelIdentity("llama", 3, 5, 9)
OTHER_MODEL = ModelIdentity("llama", 3, 5, 10)
SCOPE = Scope("session", "tenant-a", None)
OTHER = Scope("session", "tenant-b", None)
SECRET = Sealer(b"k" * 32)
N = 40  # tokens per segment


def segment(name: str = "h0", scope: object = SCOPE, seed: int = 0, n: int = N) -> StoredSegment:
    g = torch.Generator().manual_seed(seed)
    kv = KV(*(torch.randn(2, 3, n, 8, generator=g) for _ in range(2)))
    tokens = tuple(torch.randint(0, 49152, (n,), generator=g).tolist())
    return StoredSegment(scope, name, tokens, kv, "prompt", "user", "writer", 4, "m1", ((0, "m1"),))


def tier(server, identity=IDENTITY, **kw) -> RedisTier:
    kw.setdefault("retry_after_s", 0.05)
    return RedisTier(server.url, identity, SECRET, **kw)


def same(a: StoredSegment, b: StoredSegment) -> bool:
    return (a.key, a.tokens, a.kind, a.role, a.agent, a.source_start, a.slot, a.bounds) == (
        b.key, b.tokens, b.kind, b.role, b.agent, b.source_start, b.slot, b.bounds
    ) and torch.equal(a.kv.keys, b.kv.keys) and torch.equal(a.kv.values, b.kv.values)  # fmt: skip


def test_round_trip_index_and_scope(redis_server):
    t, seg = tier(redis_server), segment()
    assert t.put(seg) and seg.key in t
    assert same(t.get(seg.key, seg.tokens), seg)
    query = (7, 8, *seg.tokens[3:35], 9)  # a run of 32 of its tokens behind other ones
    assert [same(c, seg) for c in t.candidates(SCOPE, query, 4, ())] == [True]
    assert t.candidates(SCOPE, query, 4, {seg.key}) == []  # excluded: held locally
    assert t.candidates(OTHER, query, 4, ()) == []  # another tenant never sees it
    assert tier(redis_server).get(seg.key, seg.tokens) is not None  # a second replica reads it
    assert t.stats()["puts"] == 1 and "failures" not in t.stats()
    assert t.remove(seg.key) > seg.nbytes and seg.key not in t  # the entry's bytes


def _tampered(server, change) -> tuple[RedisTier, StoredSegment]:
    t, seg = tier(server), segment()
    assert t.put(seg)
    raw = server.client()
    name = t.entry_key(seg.key)
    raw.set(name, change(raw.get(name), seg))
    return t, seg


def test_entries_that_fail_a_check_are_never_served_and_deleted(redis_server):
    import hashlib

    def flip(v, seg):
        return v[:-5] + bytes([v[-5] ^ 1]) + v[-4:]

    def truncate(v, seg):
        return v[:-11]

    def resum(v, seg):  # flipped and re-checksummed: the seal still fails
        body = bytearray(v[SUM:])
        body[-3] ^= 0x40
        return hashlib.sha256(body).hexdigest().encode() + bytes(body)

    def other_model(v, seg):  # a whole valid entry of another model under this key
        o = tier(redis_server, OTHER_MODEL)
        o.put(seg)
        return redis_server.client().get(o.entry_key(seg.key))

    def other_tenant(v, seg):  # another tenant's valid entry of the same content
        foreign = segment(scope=OTHER)
        t.put(foreign)
        return redis_server.client().get(t.entry_key(foreign.key))

    t = tier(redis_server)
    for change in (flip, truncate, resum, other_model, other_tenant):
        t, seg = _tampered(redis_server, change)
        before = t.stats().get("corrupt", 0)
        assert t.get(seg.key, seg.tokens) is None, change.__name__
        assert seg.key not in t, change.__name__  # deleted
        assert t.stats()["corrupt"] == before + 1
        t.put(seg)
        redis_server.client().set(t.entry_key(seg.key), change(b"0" * SUM + b"x" * 99, seg))
        assert t.candidates(SCOPE, seg.tokens, 4, ()) == [], change.__name__


def test_wrong_tokens_are_never_served(redis_server):
    t, seg = tier(redis_server), segment()
    t.put(seg)
    assert t.get(seg.key, seg.tokens[:-1] + (5,)) is None and seg.key not in t


def test_server_killed_and_restarted_calls_go_on_and_tier_resumes(redis_server):
    t, seg = tier(redis_server), segment()
    assert t.put(seg)
    redis_server.stop()
    for i in range(20):  # every call returns (a miss or False), none raises
        assert t.get(seg.key, seg.tokens) is None
        assert t.put(segment(f"h{i}", seed=i)) is False
        assert t.candidates(SCOPE, seg.tokens, 4, ()) == []
    assert t.stats()["failures"] >= 1 and t.stats()["skipped"] >= 1
    redis_server.start()  # comes back empty (no persistence)
    time.sleep(0.06)
    assert t.put(seg) and t.get(seg.key, seg.tokens) is not None
    assert t.stats()["reconnects"] >= 1


def test_a_stalled_server_times_out_bounded(redis_server):
    t, seg = tier(redis_server, timeout_s=0.1, retry_after_s=1.0), segment()
    t.put(seg)
    redis_server.pause()
    try:
        start = time.monotonic()
        assert t.get(seg.key, seg.tokens) is None and t.put(segment("h1", seed=1)) is False
        assert time.monotonic() - start < 0.5 and t.stats()["failures"] == 1
    finally:
        redis_server.pause(False)
    time.sleep(1.05)
    assert t.get(seg.key, seg.tokens) is not None and t.stats()["reconnects"] == 1


def test_two_writers_of_one_key_leave_one_whole_entry(redis_server):
    a, b = tier(redis_server), tier(redis_server)
    for round_ in range(10):
        first = segment(f"k{round_}", seed=1)
        second = replace(first, kv=KV(first.kv.keys + 1, first.kv.values + 1))
        go = threading.Barrier(2)
        threads = [
            threading.Thread(target=lambda w=w, s=s, go=go: (go.wait(), w.put(s)))
            for w, s in ((a, first), (b, second))
        ]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        got = a.get(first.key, first.tokens)
        assert got is not None and (same(got, first) or same(got, second))
    assert "corrupt" not in a.stats()


def test_ttl_expires_entries_and_index(redis_server):
    t, seg = tier(redis_server, ttl_s=1), segment()
    t.put(seg)
    assert 0 < redis_server.client().ttl(t.entry_key(seg.key)) <= 1
    time.sleep(1.3)
    assert t.get(seg.key, seg.tokens) is None and redis_server.client().dbsize() == 0


def test_maxmemory_evicts_never_fails(redis_server):
    raw = redis_server.client()
    raw.config_set("maxmemory", "4mb")
    t = tier(redis_server)
    segs = [segment(f"m{i}", seed=i, n=2000) for i in range(40)]  # ~190 KB each: ~7.6 MB
    assert all(t.put(s) for s in segs)
    assert raw.info("memory")["used_memory"] <= 5 << 20
    assert raw.info("stats")["evicted_keys"] > 0
    served = [t.get(s.key, s.tokens) for s in segs]
    # Redis's LRU clock ticks once a second: keys written within one tick are evicted in no
    # particular order, so only "some kept, some evicted" is certain, not which
    assert any(g is not None for g in served) and any(g is None for g in served)
    assert all(g is None or same(g, s) for g, s in zip(served, segs, strict=True))
    assert "corrupt" not in t.stats() and "failures" not in t.stats()


def test_blobs_round_trip_per_scope_and_need_the_seal(redis_server):
    t = tier(redis_server)
    assert t.put_blob("pool", SCOPE, b"abc") and t.get_blob("pool", SCOPE) == b"abc"
    assert t.get_blob("pool", OTHER) is None
    other = RedisTier(redis_server.url, IDENTITY, Sealer(b"x" * 32))  # another secret
    assert other.put_blob("pool", SCOPE, b"forged")
    assert t.get_blob("pool", SCOPE) is None and t.stats()["corrupt"] == 1
    assert redis_server.client().keys("kvshare:pool:*") == []
