"""Routing policies (``kvshare.sched.routing``) and the routing simulator
(``kvshare.bench.routing``)."""

from __future__ import annotations

import pytest

from kvshare.bench.routing import Trace, measure, simulate
from kvshare.errors import ConfigError
from kvshare.sched.routing import (
    ROUTERS,
    ConsistentHash,
    PowerOfTwo,
    RoundRobin,
    TwoChoiceAffinity,
    stable_hash,
)

KEYS = [f"workflow-{i}" for i in range(200)]


def test_round_robin_takes_replicas_in_turn_and_skips_dead_ones():
    rr = RoundRobin(3)
    assert [rr.choose("k", [0, 0, 0]) for _ in range(4)] == [0, 1, 2, 0]
    assert {rr.choose("k", [0, 0, 0], [True, False, True]) for _ in range(4)} == {0, 2}
    with pytest.raises(ConfigError, match="no replica is alive"):
        rr.choose("k", [0, 0, 0], [False] * 3)


def test_power_of_two_takes_the_less_loaded_of_its_draw():
    p2 = PowerOfTwo(2, seed=1)
    assert all(p2.choose("k", [5, 0]) == 1 for _ in range(20))
    assert PowerOfTwo(1).choose("k", [9]) == 0


def test_consistent_hashing_keeps_keys_and_moves_only_a_dead_replicas_keys():
    ring = ConsistentHash(8)
    before = {k: ring.choose(k, [0] * 8) for k in KEYS}
    assert len(set(before.values())) == 8  # every replica owns some keys
    alive = [r != 3 for r in range(8)]
    after = {k: ring.choose(k, [0] * 8, alive) for k in KEYS}
    assert all(after[k] == before[k] for k in KEYS if before[k] != 3)
    assert all(after[k] != 3 for k in KEYS)
    assert stable_hash("a") == stable_hash("a") != stable_hash("b")


def test_two_choice_places_new_keys_by_load_then_sticks_until_too_far_behind():
    router = TwoChoiceAffinity(8, threshold=1)
    first, second = router.candidates("w", None, 2)
    loads = [0] * 8
    loads[first] = 1
    assert router.choose("w", loads) == second  # new: the less loaded of its two
    loads[second] = 2  # one more than the other: within the threshold, it stays
    assert router.choose("w", loads) == second
    loads[second] = 3  # two more: too far behind, it moves
    assert router.choose("w", loads) == first
    alive = [r != first for r in range(8)]  # its replica died: placed anew, by load
    now = router.candidates("w", alive, 2)
    assert second in now and router.choose("w", loads, alive) == min(now, key=loads.__getitem__)
    with pytest.raises(ConfigError, match="threshold"):
        TwoChoiceAffinity(4, threshold=-1)
    assert set(ROUTERS.names) == {"round-robin", "power-of-two", "consistent-hash", "two-choice"}


def test_the_simulation_is_deterministic_and_affinity_keeps_reuse():
    trace = Trace(workflows=120, agents=4)
    rows = {r.policy: r for r in measure(trace, [8], ROUTERS.names)}
    again = simulate(trace, 8, ROUTERS.create("two-choice")(8))
    assert again.token_reuse == rows["two-choice"].token_reuse
    assert rows["consistent-hash"].token_reuse > 2 * rows["round-robin"].token_reuse
    assert rows["two-choice"].token_reuse >= 0.95 * rows["consistent-hash"].token_reuse
    assert rows["two-choice"].imbalance < rows["consistent-hash"].imbalance
    for r in rows.values():
        assert 0 < r.token_reuse < 1 and r.imbalance >= 1 and r.p99_wait_ms >= r.p50_wait_ms


def test_on_one_replica_every_policy_reuses_the_same():
    reuse = {r.token_reuse for r in measure(Trace(workflows=30), [1], ROUTERS.names)}
    assert len(reuse) == 1
