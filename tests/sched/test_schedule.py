"""kvshare.sched.schedule: steps to execution on step graphs, hints, eviction order and pins."""

from __future__ import annotations

import math
from typing import TypedDict

import networkx as nx
import pytest

from kvshare.errors import ConfigError
from kvshare.sched.hints import Hint
from kvshare.sched.schedule import (
    LRUScheduler,
    Scheduler,
    SchedulerConfig,
    SegmentInfo,
    as_step_graph,
    steps_to_execution,
)

from factories import run_threads

START, END = "__start__", "__end__"
INF = math.inf


def _graph(*edges: tuple[str, str, str]) -> nx.DiGraph:
    g = nx.DiGraph()
    for a, b, kind in edges:
        g.add_edge(a, b, kind=kind)
    return g


def _hint(session="s", running=None, next=(), release=(), ttl=None, at=0.0) -> Hint:
    return Hint(session, running, tuple(next), tuple(release), ttl, at)


class _State(TypedDict):
    x: int


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_chain_counts_one_step_per_edge_without_start_and_end():
    steps = steps_to_execution(as_step_graph(["a", "b", "c"]), running=["a"])
    assert steps == {"a": 0, "b": 1, "c": 2}
    assert steps_to_execution(as_step_graph(["a", "b"]), running=[START]) == {"a": 1, "b": 2}


def test_branch_takes_the_nearest_target():
    g = _graph(("a", "b", "branch"), ("a", "c", "branch"), ("b", "x", "edge"))
    g.add_edges_from([("x", "d"), ("c", "d"), ("d", "e")], kind="edge")
    g.add_edge("z", "a", kind="edge")  # nothing leads to z: never
    steps = steps_to_execution(g, running=["a"])
    assert steps == {"a": 0, "b": 1, "c": 1, "x": 2, "d": 2, "e": 3, "z": INF}


def test_join_waits_for_every_predecessor_still_to_run():
    # a -> m -> b; [a, b] -> c: c waits for b (2 steps away), not just for a
    g = _graph(("a", "m", "edge"), ("m", "b", "edge"), ("a", "c", "join"), ("b", "c", "join"))
    assert steps_to_execution(g, running=["a"])["c"] == 3  # max(0, 2) + 1
    assert steps_to_execution(g, running=["a"], done=["b"])["c"] == 1
    assert steps_to_execution(g, running=["a", "b"])["c"] == 1
    assert steps_to_execution(g, running=["m"], done=["a", "b"])["c"] == 1  # inputs all ran
    g.remove_edge("m", "b")  # b can never run: c waits forever
    assert steps_to_execution(g, running=["a"])["c"] == INF
    # a ran already (its input is in), runs again at 1: only b's run (at 2) is awaited
    h = _graph(("r", "a", "edge"), ("r", "x", "edge"), ("x", "b", "edge"))
    h.add_edges_from([("a", "c"), ("b", "c")], kind="join")
    assert steps_to_execution(h, running=["r"], done=["a"])["c"] == 3


def test_a_node_with_join_and_plain_inputs_takes_the_nearer_way():
    g = _graph(("a", "b", "edge"), ("b", "c", "edge"), ("c", "j", "join"), ("x", "j", "join"))
    g.add_edge("a", "j", kind="send")
    assert steps_to_execution(g, running=["a"])["j"] == 1
    g.remove_edge("a", "j")
    assert steps_to_execution(g, running=["a"])["j"] == INF  # x never runs


def test_loops_end_and_give_the_way_round():
    g = _graph(("a", "b", "edge"), ("b", "c", "edge"), ("c", "a", "branch"))
    g.add_edge("c", END, kind="branch")
    assert steps_to_execution(g, running=["b"]) == {"b": 0, "c": 1, "a": 2}
    g.add_edge("b", "b", kind="command")  # a self-loop changes nothing
    assert steps_to_execution(g, running=["b"])["a"] == 2
    # a join waiting on an agent that only runs after the join: deadlocked, not a hang
    dead = _graph(("a", "j", "join"), ("b", "j", "join"), ("j", "b", "edge"))
    assert steps_to_execution(dead, running=["a"]) == {"a": 0, "j": INF, "b": INF}
    ring = nx.DiGraph()
    nx.add_cycle(ring, [f"n{i}" for i in range(2000)], kind="edge")
    assert steps_to_execution(ring, ["n0"], max_loop=5000)["n1999"] == 1999


def test_max_loop_bounds_the_look_ahead():
    chain = as_step_graph([f"a{i}" for i in range(10)])
    steps = steps_to_execution(chain, running=["a0"], max_loop=3)
    assert steps["a3"] == 3 and steps["a4"] == INF
    with pytest.raises(ConfigError):
        steps_to_execution(chain, running=["a0"], max_loop=-1)


def test_send_fan_out_reaches_every_target_in_one_step():
    g = _graph(*[("router", w, "send") for w in ("w1", "w2", "w3")], ("w1", "sum", "edge"))
    assert steps_to_execution(g, ["router"]) == {"router": 0, "w1": 1, "w2": 1, "w3": 1, "sum": 2}


def test_subgraph_links_enter_and_leave():
    g = _graph(("p", "s1", "subgraph"), ("s1", "s2", "edge"), ("s2", "q", "subgraph"))
    assert steps_to_execution(g, ["p"]) == {"p": 0, "s1": 1, "s2": 2, "q": 3}


def test_a_langgraph_graph_with_branch_send_join_and_subgraph():
    from langgraph.graph import StateGraph
    from langgraph.types import Send

    def noop(state: _State) -> dict:
        return {}

    sub = StateGraph(_State)
    sub.add_node("s1", noop)
    sub.add_node("s2", noop)
    sub.add_edge("__start__", "s1")
    sub.add_edge("s1", "s2")
    g = StateGraph(_State)
    for n in ("planner", "critic", "judge", "writer", "editor"):
        g.add_node(n, noop)
    g.add_node("inner", sub.compile())
    g.add_edge(START, "planner")
    g.add_conditional_edges("planner", lambda s: "critic", {"critic": "critic", "judge": "judge"})
    g.add_conditional_edges("critic", lambda s: [Send("writer", s)])
    g.add_edge(["judge", "writer"], "editor")
    g.add_edge("editor", "inner")
    sched = Scheduler()
    sched.register("t", g.compile())
    sched.observe(_hint("t", running="planner"))
    got = {a: sched.steps("t", a) for a in ("critic", "judge", "writer", "editor", "inner", "s2")}
    # the critic's Send may reach any node: editor at 2 (before the join's 3), inner too
    assert got == {"critic": 1, "judge": 1, "writer": 2, "editor": 2, "inner": 2, "s2": 4}


def test_scheduler_follows_steps_parallel_branches_and_joins():
    g = _graph((START, "a", "edge"), (START, "b", "edge"), ("a", "c", "join"), ("b", "c", "join"))
    g.add_edges_from([("c", "d"), ("d", "c")], kind="branch")
    sched = Scheduler()
    sched.register("s", g)
    assert sched.steps("s", "a") == sched.steps("s", "b") == 1
    sched.observe(_hint(running="a"))  # b started in the same step
    assert (sched.steps("s", "a"), sched.steps("s", "b"), sched.steps("s", "c")) == (0, 0, 1)
    sched.observe(_hint(running="c"))  # the join consumed a and b
    assert sched.steps("s", "d") == 1 and sched.steps("s", "a") == INF
    sched.observe(_hint(running="d"))
    assert sched.steps("s", "c") == 1  # back round the loop: c is not a join from d


def test_a_join_in_a_loop_waits_again_for_its_inputs_next_round():
    g = _graph((START, "x", "edge"), ("x", "a", "edge"), ("x", "b", "edge"))
    g.add_edges_from([("a", "c"), ("b", "c")], kind="join")
    g.add_edges_from([("c", "x"), ("c", END)], kind="branch")
    sched = Scheduler()
    sched.register("s", g)
    for agent in ("x", "a", "c"):
        sched.observe(_hint(running=agent))
    assert sched.steps("s", "x") == 1 and sched.steps("s", "b") == 2  # round the loop
    sched.observe(_hint(running="x"))  # round two: a and b must run again before c
    assert (sched.steps("s", "a"), sched.steps("s", "b"), sched.steps("s", "c")) == (1, 1, 2)


def test_a_subgraph_holder_keeps_running_while_its_agents_run():
    g = _graph((START, "p", "edge"), ("p", "s1", "subgraph"), ("s1", "s2", "edge"))
    g.add_edge("s2", "q", kind="subgraph")
    g.add_edge("p", "q", kind="edge")
    sched = Scheduler()
    sched.register("s", g)
    for agent in ("p", "s1", "s2"):
        sched.observe(_hint(running=agent))
        assert sched.steps("s", "p") == 0  # p runs the subgraph its agents run in
    assert (sched.steps("s", "s1"), sched.steps("s", "q")) == (INF, 1)
    sched.observe(_hint(running="q"))  # the subgraph (and p) finished
    assert (sched.steps("s", "p"), sched.steps("s", "s2"), sched.steps("s", "q")) == (INF, INF, 0)


def test_scheduler_reads_orders_successors_and_sessions():
    sched = Scheduler()
    sched.register("chain", ["a", "b", "c"])
    sched.observe(_hint("chain", running="b"))
    assert [sched.steps("chain", x) for x in "abc"] == [INF, 0, 1]

    class _Session:
        order = ("a",)
        successors = {"a": ["b", "c"], "c": ["d"]}

    sched.register("graph", _Session())
    sched.observe(_hint("graph", running="a"))
    assert [sched.steps("graph", x) for x in "abcd"] == [0, 1, 1, 2]
    with pytest.raises(ConfigError):
        sched.register("bad", 42)
    with pytest.raises(ConfigError):
        sched.register("bad", _graph(("a", "b", "teleport")))
    assert sched.steps("unknown", "a") == INF


def test_hints_next_release_and_ttl_with_a_fake_clock():
    clock = _Clock()
    sched = Scheduler(clock=clock)
    sched.register("s", ["a", "b", "c", "d"])
    sched.observe(_hint(running="a", next=["d", "c"], ttl=10.0, at=0.0))
    assert [sched.steps("s", x) for x in "abcd"] == [0, 1, 2, 1]  # b from the graph
    clock.now = 10.0  # the ranks lapse: the graph's estimate again
    assert [sched.steps("s", x) for x in "abcd"] == [0, 1, 2, 3]
    sched.observe(_hint(next=["c"], release=["b"], at=10.0))
    assert (sched.steps("s", "b"), sched.steps("s", "c"), sched.steps("s", "d")) == (INF, 1, 3)
    sched.observe(_hint(at=11.0))  # next lasts until the next hint, a release stays
    assert (sched.steps("s", "b"), sched.steps("s", "c")) == (INF, 2)
    sched.observe(_hint(release=["c"], ttl=5.0, at=11.0))
    clock.now = 15.9
    assert sched.steps("s", "c") == INF
    clock.now = 16.0
    assert sched.steps("s", "c") == 2
    sched.observe(_hint(running="b", at=16.0))  # running un-releases
    assert sched.steps("s", "b") == 0
    sched.observe(_hint(release=["a", "b", "c", "d"], at=17.0))  # the session ended
    assert all(sched.steps("s", x) == INF for x in "abcd")
    sched.forget("s")
    assert sched.steps("s", "a") == INF


def test_hints_alone_order_agents_of_an_unregistered_session():
    sched = Scheduler()
    sched.observe(_hint("h", running="x", next=["y"]))
    sched.observe(_hint("h", running="y", next=["z"], release=["y"]))
    assert (sched.steps("h", "x"), sched.steps("h", "y"), sched.steps("h", "z")) == (INF, 0, 1)
    sched.observe(_hint("h", running="z"))
    assert sched.steps("h", "y") == INF  # released once it finished


def _seg(key, users, tick, nbytes=10, shared=False) -> SegmentInfo:
    return SegmentInfo(key, nbytes, users, tick, shared)


def test_eviction_order_keeps_the_next_agent_and_drops_released_first():
    sched = Scheduler()
    sched.register("s", ["a", "b", "c", "d"])
    sched.observe(_hint(running="a", release=["d"]))
    segs = [
        _seg("b-old", [("s", "b")], tick=1),  # runs next: kept longest
        _seg("c-old", [("s", "c")], tick=2),
        _seg("c-new", [("s", "c")], tick=9),  # same steps: LRU breaks the tie
        _seg("d", [("s", "d")], tick=50),  # released: first out despite being recent
        _seg("gone", [("other", "x")], tick=60),  # unknown: never again
        _seg("bc", [("s", "c"), ("s", "b")], tick=0),  # the nearest user counts
    ]
    assert sched.eviction_order(segs) == ["d", "gone", "c-old", "c-new", "bc", "b-old"]
    assert sched.priority([("s", "a")], 1) < sched.priority([("s", "b")], 3)  # a: not again
    assert sched.priority([], 5).steps == INF


def test_a_running_agent_needs_its_kv_again_at_its_next_run_not_now():
    """What the running agent reads is leased by the store while it reads; for eviction it
    counts from the agent's next run: the way round a cycle, its hinted rank, or never."""
    sched = Scheduler()
    sched.register("s", {"a": ["b"], "b": ["c"], "c": ["a"]})
    sched.observe(_hint(running="a", next=["b"]))
    assert sched.steps("s", "a") == 0 and sched.need("s", "a") == 3  # b, c, then a
    assert sched.need("s", "b") == 1 and sched.need("s", "c") == 2
    assert sched.priority([("s", "a")], 9) < sched.priority([("s", "c")], 0)
    sched.observe(_hint(running="a", next=["a"]))  # it calls itself again next
    assert sched.need("s", "a") == 1
    sched.observe(_hint(release=["a"]))
    assert sched.need("s", "a") == INF
    chain = Scheduler()
    chain.register("t", ["x", "y"])
    chain.observe(_hint(session="t", running="x"))
    assert chain.need("t", "x") == INF and chain.need("t", "y") == 1


def test_lru_scheduler_is_lru_only():
    lru = LRUScheduler()
    lru.register("s", ["a", "b"])
    lru.observe(_hint(running="a", next=["b"]))
    segs = [_seg("a", [("s", "a")], tick=5), _seg("b", [("s", "b")], tick=3), _seg("x", [], 4)]
    assert lru.eviction_order(segs) == ["b", "x", "a"]
    assert lru.steps("s", "a") == INF


def test_pins_most_shared_prefixes_first_within_the_byte_cap():
    sched = Scheduler(SchedulerConfig(pin_bytes=100))
    sched.register("s", ["a", "b", "c"])
    users3 = [("s", "a"), ("s", "b"), ("s", "c")]
    segs = [
        _seg("sys-all", users3, tick=0, nbytes=60, shared=True),
        _seg("tools-ab", users3[:2], tick=0, nbytes=50, shared=True),  # does not fit after
        _seg("tools-c", users3[2:], tick=0, nbytes=40, shared=True),
        _seg("private", users3, tick=0, nbytes=1),  # not a shared prefix
    ]
    assert sched.pinned(segs) == {"sys-all", "tools-c"}
    assert sched.eviction_order(segs) == ["tools-ab", "private"]
    sched.observe(_hint(release=["c"]))  # released agents no longer hold pins
    assert sched.pinned(segs) == {"tools-ab"}  # 2 users each: the smaller first
    assert Scheduler().pinned(segs) == frozenset()  # cap 0: nothing pinned
    with pytest.raises(ConfigError):
        SchedulerConfig(pin_bytes=-1)


def test_concurrent_observe_and_priority_smoke():
    sched = Scheduler(SchedulerConfig(max_sessions=8))
    agents = [f"a{i}" for i in range(6)]

    def work(t: int) -> None:
        for i in range(300):
            session = f"s{(t + i) % 12}"
            if i % 50 == 0:
                sched.register(session, agents)
            sched.observe(_hint(session, running=agents[i % 6], next=agents[:2]))
            p = sched.priority([(session, a) for a in agents[3:]], i)
            assert 0 <= p.steps <= 6 or p.steps == INF
            if i % 97 == 0:
                sched.forget(session)

    assert run_threads(work) == []
