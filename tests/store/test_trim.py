"""Cutting traces to their heads (kvshare.store.trim) and the tiered store that does it under
pressure: heads are exact, only traces no one else needs are cut, learnt per writer."""

from __future__ import annotations

import pytest
import torch

from kvshare.model.prompt import token_hash
from kvshare.sched.hints import Hint
from kvshare.sched.schedule import Scheduler, SchedulerConfig
from kvshare.store.segments import StoredSegment
from kvshare.store.tiered import TieredStore, scheduler_priority
from kvshare.store.tiers import MemoryTier
from kvshare.store.trim import HEAD, cut

from factories import TOKEN_BYTES, kv_for


def trace(tokens, agent: str = "k") -> StoredSegment:
    tokens = tuple(tokens)
    bounds = ((0, "m0"), (10, "m1"), (len(tokens) - 2, "reply"))
    return StoredSegment(
        "t:", token_hash(tokens), tokens, kv_for(tokens), "trace", "", agent, 0, "m0", bounds
    )


def test_a_head_is_the_exact_prefix_of_a_trace_with_its_own_memory():
    whole = trace(range(100, 130))
    head = cut(whole, 12)
    assert head.tokens == whole.tokens[:12] and head.content_hash == token_hash(head.tokens)
    assert torch.equal(head.kv.keys, whole.kv.keys[:, :, :12]) and head.kind == HEAD
    assert head.kv.keys.untyped_storage().nbytes() == head.kv.keys.nbytes  # not a view
    assert head.bounds == ((0, "m0"), (10, "m1")) and head.nbytes == 12 * TOKEN_BYTES
    for n in (0, 30, -1):
        with pytest.raises(ValueError, match="cut"):
            cut(whole, n)


def store(device_tokens: int, host_tokens: int = 0) -> TieredStore:
    def priority(users, tick):  # k runs in 5 steps, k1 next
        steps = {"k": 5, "k1": 1}
        return (-min((steps.get(a, float("inf")) for _, a in users), default=float("inf")), tick)

    tiers = [MemoryTier("device", "cpu", device_tokens * TOKEN_BYTES)]
    if host_tokens:
        tiers.append(MemoryTier("host", "cpu", host_tokens * TOKEN_BYTES))
    return TieredStore(tiers, priority, trim=True)


def run_twice(s: TieredStore, second_prompt: tuple[int, ...]) -> tuple[StoredSegment, ...]:
    """k writes a trace, then calls again with ``second_prompt`` (what it shares with its
    last trace is what it reads again) and writes another (the first, superseded, goes);
    k1 then writes one that needs room."""
    first = trace(range(100, 130))
    s.put(first, ("s", "k"))
    s.record_call([], first.key, ("s", "k"), (), first.tokens[:28])
    second = trace((*second_prompt, 7, 8))
    s.put(second, ("s", "k"))
    s.record_call([first.key], second.key, ("s", "k"), (), second_prompt)
    other = trace(range(500, 530), agent="k1")
    s.put(other, ("s", "k1"))
    return first, second, other


def test_a_trace_only_its_writer_needs_is_cut_to_the_head_it_reads_again():
    s = store(device_tokens=50)  # one trace and a head: the second trace must give way
    _, second, other = run_twice(s, (*range(100, 120), *range(300, 308)))  # 20 shared
    assert s.trims == 1 and second.key not in s and other.key in s
    found = s.match("t:", (*range(100, 120), 999))
    assert [(m.start, m.length) for m in found] == [(0, 20)]
    head = found[0].segment
    assert head.kind == HEAD and torch.equal(head.kv.values, second.kv.values[:, :, :20])
    assert s.keys_used_by([("s", "k")]) == [head.key]  # the writer's link moved to it
    s.release([head.key])


def test_with_a_tier_below_the_whole_trace_goes_down_and_nothing_is_lost():
    s = store(device_tokens=50, host_tokens=100)
    _, second, other = run_twice(s, (*range(100, 120), *range(300, 308)))
    assert s.trims == 1 and s.tier_of(second.key) == "host" and s.tier_of(other.key) == "device"
    assert s.evictions == 0
    found = s.match("t:", second.tokens)  # a reader the model did not foresee: a demand load
    assert [(m.start, m.length) for m in found] == [(0, 30)] and s.demand_misses["host"] == 1
    s.release([m.segment.key for m in found])


def test_a_writer_that_reads_all_of_its_last_trace_is_never_cut():
    s = store(device_tokens=50)
    _, second, other = run_twice(s, (*range(100, 130), 5, 6))  # a conversation goes on
    assert s.trims == 0 and second.key not in s and other.key in s  # out whole, not cut


def test_a_head_several_agents_use_is_pinned_on_the_device_tier():
    """A cut head that several agents use (their shared system prompt) is a shared prefix:
    kept on the device tier within the pin cap, whatever its priority (here LRU: it is the
    oldest)."""
    sched = Scheduler(SchedulerConfig(pin_bytes=1 << 20))
    tiers = [MemoryTier("device", "cpu", 50 * TOKEN_BYTES)]
    s = TieredStore(tiers, scheduler_priority(sched), sched.pinned, trim=True)
    _, _, other = run_twice(s, (*range(100, 120), *range(300, 308)))
    (head,) = [k for k in s.placement() if k != other.key]
    s.used_by([head], ("s", "j"))  # a second agent starts with the same 20 tokens
    s.put(trace(range(700, 720), agent="m"), ("s", "m"))
    assert head in s and other.key not in s
    sched.observe(Hint("s", None, (), ("k", "j"), None, 0.0))  # released: pins no more
    s.put(trace(range(800, 830), agent="m"), ("s", "m"))
    assert head not in s


def test_a_head_that_went_down_comes_back_up_when_the_same_head_is_cut_again():
    """An agent's heads are the same tokens every time (same key): a fresh cut replaces the
    copy that was demoted earlier, so the writer's next call does not miss."""
    s = store(device_tokens=50, host_tokens=200)
    run_twice(s, (*range(100, 120), *range(300, 308)))
    head = ("t:", token_hash(tuple(range(100, 120))))
    assert s.tier_of(head) == "device"
    s.put(trace(range(600, 620), agent="x"), ("s", "x"), ["k1"])  # for k1: the head goes down
    assert s.tier_of(head) == "host"
    third = trace((*range(100, 120), *range(400, 408), 7, 8))
    s.put(third, ("s", "k"))
    s.record_call([], third.key, ("s", "k"), (), (*range(100, 120), *range(400, 408)))
    s.put(trace(range(900, 910), agent="y"), ("s", "y"), ["k1"])  # pressure: the third is cut
    assert s.trims == 2 and s.tier_of(head) == "device" and s.tier_of(third.key) == "host"
    assert s.keys_used_by([("s", "k")]) == [head]
