"""Segment store and radix prefix cache: budget, eviction, verification, scope isolation."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvshare.model.prompt import token_hash
from kvshare.store.radix import RadixCache
from kvshare.store.segments import LRUSegmentStore, NullSegmentStore

from factories import TOKEN_BYTES, kv_for, seg


def test_lru_budget_and_eviction_order():
    store = LRUSegmentStore(budget_bytes=10 * TOKEN_BYTES)
    a, b, c = seg([1, 2, 3, 4]), seg([5, 6, 7]), seg([8, 9, 10])
    assert store.put(a) and store.put(b) and store.put(c)
    assert store.bytes_used == 10 * TOKEN_BYTES
    assert store.get("t:", a.content_hash, a.tokens) is a  # a becomes most recent
    assert store.put(seg([11, 12]))  # must evict b (least recently used), not a
    assert b.key not in store and a.key in store and c.key in store
    assert store.bytes_used <= store.budget_bytes and store.evictions == 1


def test_oversized_segment_is_refused_and_store_unchanged():
    store = LRUSegmentStore(budget_bytes=3 * TOKEN_BYTES)
    small = seg([1, 2])
    store.put(small)
    assert not store.put(seg([1, 2, 3, 4]))
    assert len(store) == 1 and store.bytes_used == 2 * TOKEN_BYTES


def test_hash_hit_is_verified_token_by_token_and_scoped():
    store = LRUSegmentStore(budget_bytes=1 << 20)
    store.put(seg([1, 2, 3], chash="same"))
    assert store.get("t:", "same", (1, 2, 3)) is not None
    assert store.get("t:", "same", (1, 2, 4)) is None  # a colliding hash never passes
    assert store.get("t:other", "same", (1, 2, 3)) is None  # another tenant's scope


def test_null_store_stores_nothing():
    store = NullSegmentStore()
    assert not store.put(seg([1]))
    assert len(store) == 0 and store.get("t:", token_hash((1,)), (1,)) is None


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 9), min_size=1, max_size=8), min_size=1, max_size=12),
    st.integers(0, 40),
)
def test_lru_budget_invariant(seqs, budget_tokens):
    store = LRUSegmentStore(budget_bytes=budget_tokens * TOKEN_BYTES)
    for s in seqs:
        store.put(seg(s))
        assert store.bytes_used <= store.budget_bytes
        assert store.bytes_used == sum(x.nbytes for x in store.stored())


def test_radix_longest_prefix_and_split():
    cache = RadixCache(budget_bytes=1 << 20)
    cache.insert("s", [1, 2, 3, 4, 5], kv_for([1, 2, 3, 4, 5]))
    cache.insert("s", [1, 2, 3, 9], kv_for([1, 2, 3, 9]))
    n, parts = cache.match("s", [1, 2, 3, 4, 7])
    assert n == 4
    got = torch.cat([p.keys for p in parts], 2)[0, 0, :, 0].tolist()
    assert got == [1, 2, 3, 4]
    n, parts = cache.match("s", [1, 2, 3, 9, 9])
    assert n == 4 and torch.cat([p.keys for p in parts], 2)[0, 0, -1, 0] == 9
    assert cache.match("other", [1, 2, 3])[0] == 0


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=10), min_size=1, max_size=10),
    st.integers(0, 30),
)
def test_radix_matches_are_true_prefixes_within_budget(seqs, budget_tokens):
    cache = RadixCache(budget_bytes=budget_tokens * TOKEN_BYTES)
    for s in seqs:
        cache.insert("s", s, kv_for(s))
        assert cache.bytes_used <= cache.budget_bytes
    for s in seqs:
        n, parts = cache.match("s", s)
        if n:
            got = torch.cat([p.keys for p in parts], 2)[0, 0, :, 0].tolist()
            assert got == [float(x) for x in s[:n]]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 49151), min_size=0, max_size=80))
def test_window_hashes_are_the_polynomial_hash_of_every_window(tokens):
    from kvshare.store.segments import MIN_MATCH, window_hashes

    base, mod = 0x9E3779B97F4A7C15, 1 << 64
    expected = [
        sum(t * pow(base, MIN_MATCH - 1 - j, mod) for j, t in enumerate(tokens[i : i + MIN_MATCH]))
        % mod
        for i in range(len(tokens) - MIN_MATCH + 1)
    ]
    assert window_hashes(tokens) == expected


def test_matches_are_verified_even_when_every_window_collides(monkeypatch):
    """A hash only proposes candidates: with one hash for every window the matches found are
    still exactly the verified ones, and removal leaves no stale entries."""
    import kvshare.store.segments as store_mod

    text = list(range(100, 160))
    store = LRUSegmentStore(budget_bytes=1 << 20)
    store.put(seg(text))
    store.put(seg(list(range(500, 540))))
    honest = store.match("t:", [1, 2, *text[5:45], 3])
    monkeypatch.setattr(store_mod, "window_hashes", lambda toks: [7] * max(0, len(toks) - 15))
    colliding = LRUSegmentStore(budget_bytes=1 << 20)
    colliding.put(seg(text))
    colliding.put(seg(list(range(500, 540))))
    found = colliding.match("t:", [1, 2, *text[5:45], 3])
    assert [(m.start, m.length, m.offset) for m in found] == [(2, 40, 5)]
    assert [(m.start, m.length, m.offset) for m in honest] == [(2, 40, 5)]
    colliding.clear()
    assert colliding.match("t:", text) == []


def test_evicted_traces_leave_the_window_index():
    store = LRUSegmentStore(budget_bytes=60 * TOKEN_BYTES)
    first, second = list(range(100, 140)), list(range(200, 240))
    store.put(seg(first))
    assert store.match("t:", first)[0].length == 40
    store.put(seg(second))  # 80 tokens > budget: the first is evicted
    assert store.match("t:", first) == [] and store.match("t:", second)[0].length == 40
    index = store.index
    assert index.scopes() == {"t:"} and index.keys() == [seg(second).key]
    assert index.indexed("t:") == {seg(second).key}


def test_equal_runs_come_from_the_newest_segment():
    """An agent reads its prefix from its latest trace, so older copies fall out of use."""
    store = LRUSegmentStore(budget_bytes=1 << 20)
    head = list(range(1, 21))
    old, new = seg([*head, *range(100, 110)]), seg([*head, *range(200, 210)])
    store.put(old)
    store.put(new)
    found = store.match("t:", [*head, 999])
    assert [(m.start, m.length, m.segment.key) for m in found] == [(0, 20, new.key)]
    found = store.match("t:", [*head, 100, 101])  # a longer run still wins
    assert [(m.length, m.segment.key) for m in found] == [(22, old.key)]
