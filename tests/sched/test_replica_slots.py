"""AffinityChooser / ReplicaSlots: a live router's pure half (no Ray)."""

from __future__ import annotations

from kvshare.sched.replicas import AffinityChooser, ReplicaSlots
from kvshare.sched.routing import TwoChoiceAffinity


def test_slots_are_stable_and_a_new_id_takes_a_dead_ones_slot():
    slots = ReplicaSlots()
    slots.update(["b", "a", "c"])
    assert slots.owners() == ["a", "b", "c"]
    slots.update(["a", "c"])  # b died
    assert slots.owners() == ["a", None, "c"] and slots.slot("b") is None
    slots.update(["a", "c", "z"])  # its replacement
    assert slots.owners() == ["a", "z", "c"]


def test_a_key_stays_on_its_replica_and_both_replicas_get_keys():
    chooser, live = AffinityChooser(threshold=1), ["r0", "r1"]
    first = {k: chooser.rank(f"wf{k}", live, {})[0] for k in range(16)}
    assert set(first.values()) == {"r0", "r1"}  # keys spread over the ring
    for k, replica in first.items():
        for _ in range(3):
            assert chooser.rank(f"wf{k}", live, {replica: 1})[0] == replica  # within threshold


def test_a_load_gap_over_the_threshold_moves_a_key_to_its_other_choice():
    chooser, live = AffinityChooser(threshold=2), ["r0", "r1"]
    home = chooser.rank("wf", live, {})[0]
    other = "r1" if home == "r0" else "r0"
    assert chooser.rank("wf", live, {home: 2, other: 0})[0] == home
    assert chooser.rank("wf", live, {home: 3, other: 0})[0] == other
    assert chooser.rank("wf", live, {home: 0, other: 0})[0] == other  # it stays there now


def test_a_dead_replica_drops_out_and_its_keys_take_their_second_choice():
    chooser, live = AffinityChooser(), ["r0", "r1", "r2", "r3"]
    ranks = {k: chooser.rank(f"wf{k}", live, {}) for k in range(32)}
    victim = ranks[0][0]
    alive = [r for r in live if r != victim]
    for k, order in ranks.items():
        now = chooser.rank(f"wf{k}", alive, {})
        assert victim not in now and sorted(now) == sorted(alive)
        assert now[0] == (order[1] if order[0] == victim else order[0])  # the rest stay put


def test_ranks_hold_every_live_replica_and_settle_overrides_the_pick():
    chooser = AffinityChooser()
    order = chooser.rank("k", ["a", "b", "c"], {"a": 5, "b": 0, "c": 1})
    assert sorted(order) == ["a", "b", "c"]
    chooser.settle("k", order[1])  # the pick refused it: it went to the second
    assert chooser.rank("k", ["a", "b", "c"], {})[0] == order[1]
    assert chooser.rank("k", [], {}) == []


def test_grown_router_keeps_keys_and_memory():
    small = TwoChoiceAffinity(2)
    picks = {f"k{i}": small.choose(f"k{i}", [0, 0]) for i in range(20)}
    big = small.grown(3)
    kept = sum(big.choose(k, [0, 0, 0]) == r for k, r in picks.items())
    assert kept == 20  # remembered keys stay where they went (loads equal)
