"""wrap(): the step graph read from a LangGraph builder, and hints while the graph runs."""

from __future__ import annotations

import operator
from typing import Annotated, Literal, TypedDict

from kvshare.integrations.langchain import ChatKVShare
from kvshare.integrations.langgraph import step_graph, wrap
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from langgraph.types import Send

from factories import team


class _S(TypedDict):
    notes: Annotated[list[str], operator.add]


def _shape(node_fn):
    """A graph with a conditional edge (Literal), a Send fan-out without a path_map and a
    join: planner -> (critic | judge); critic -> Send(writer) x2; [judge, writer] -> editor."""

    def route(state: _S) -> Literal["critic", "judge"]:
        return "critic"

    def fan(state: _S):
        return [Send("writer", state), Send("writer", state)]

    g = StateGraph(_S)
    for n in ("planner", "critic", "judge", "writer", "editor"):
        g.add_node(n, node_fn(n))
    g.add_edge(START, "planner")
    g.add_conditional_edges("planner", route)
    g.add_conditional_edges("critic", fan)
    g.add_edge(["judge", "writer"], "editor")
    g.add_edge("editor", END)
    return g


def test_step_graph_reads_edges_branches_sends_and_joins():
    steps = step_graph(_shape(lambda n: lambda s: {"notes": [n]}).compile())
    kind = {(a, b): d["kind"] for a, b, d in steps.edges(data=True)}
    assert kind[(START, "planner")] == "edge" and kind[("editor", END)] == "edge"
    assert kind[("planner", "critic")] == kind[("planner", "judge")] == "branch"
    assert kind[("critic", "writer")] == "send"  # unknown until it runs: every node
    assert kind[("judge", "editor")] == kind[("writer", "editor")] == "join"


def test_a_wrapped_graph_runs_unchanged_and_hints_its_engine(tiny_engine):
    def build(model):
        def node(name):
            def run(state: _S) -> _S:
                msgs = team(name, extra=[{"role": "user", "content": "Go."}])
                return {"notes": [str(model.invoke(msgs).content)]}

            return run

        return _shape(node).compile(checkpointer=InMemorySaver())

    cfg = {"configurable": {"thread_id": "t-9"}}
    plain_model = ChatKVShare(engine=tiny_engine.fork(mode="prefix"), max_tokens=3)
    plain = build(plain_model).invoke({"notes": []}, cfg)
    model = ChatKVShare(engine=tiny_engine.fork(mode="prefix"), max_tokens=3)
    app = build(model)
    assert wrap(app, model.engine) is app  # the graph itself: nothing about its runs changes
    assert app.invoke({"notes": []}, cfg) == plain
    hints = model.engine.hints("t-9")
    # the join waits for judge, which the branch skipped: the run ends after the writers
    assert [h.running for h in hints] == ["planner", "critic", "writer", "writer"]
    by_node = {h.running: h.next for h in hints}
    assert by_node["planner"] == ("critic", "judge") and by_node["writer"] == ("editor",)
    assert set(by_node["critic"]) >= {"writer", "editor"}  # a Send router: any node
    assert plain_model.engine.hints() == []  # an unwrapped run gives no hints


def test_parallel_branches_share_one_engine_safely(tiny_engine):
    """Three nodes in one superstep run on LangGraph's thread pool against one engine: the
    outputs equal a serial run's (``prefix`` mode is exact), every call is recorded once and
    the stores stay within their budgets."""
    roles = ("planner", "critic", "judge")
    model = ChatKVShare(engine=tiny_engine.fork(mode="prefix"), max_tokens=5)

    def node(name):
        def run(state: _S) -> _S:
            msgs = team(name, extra=[{"role": "user", "content": "Go."}])
            return {"notes": [f"{name}:{model.invoke(msgs).content}"]}

        return run

    g = StateGraph(_S)
    for r in roles:
        g.add_node(r, node(r))
        g.add_edge(START, r)
        g.add_edge(r, END)
    app = wrap(g.compile(checkpointer=InMemorySaver()), model.engine)
    out = app.invoke({"notes": []}, {"configurable": {"thread_id": "par"}})
    serial = tiny_engine.fork(mode="prefix")
    go = [{"role": "user", "content": "Go."}]
    expected = {f"{r}:{serial.chat(team(r, extra=go), max_new_tokens=5).text}" for r in roles}
    assert set(out["notes"]) == expected
    calls = model.engine.calls
    assert sorted(c.agent for c in calls) == sorted(roles)
    mem, cfg = model.engine.memory(), model.engine.config.store
    assert mem.prefix_cache <= cfg.prefix_cache_bytes and mem.segments <= cfg.segment_store_bytes
    assert sorted(h.running for h in model.engine.hints("par")) == sorted(roles)
