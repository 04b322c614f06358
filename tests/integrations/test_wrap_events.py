"""wrap() changes nothing a LangGraph run shows: outputs, every stream mode, astream_events,
checkpoint history and LangGraph's own handling of bad routes, on one graph with a
conditional edge, a ``Send`` fan-out, a join, a bounded loop and a subgraph node."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import operator
import re
from collections import defaultdict
from collections.abc import Iterator
from typing import Annotated, Any, Literal, TypedDict

import pytest
from kvshare.integrations.langchain import ChatKVShare
from kvshare.integrations.langgraph import step_graph, successors, wrap
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.config import get_stream_writer
from langgraph.errors import GraphRecursionError
from langgraph.graph import END, START, StateGraph
from langgraph.types import Send
from pydantic import BaseModel

from factories import DOC, fingerprint

MODES = ["updates", "values", "messages", "custom", "debug"]
TOPIC = {"topic": "ships"}


class Echo(BaseChatModel):
    """A scripted model: the reply is a hash of the prompt, so parallel branches are
    deterministic whatever order they run in; it streams word by word."""

    @property
    def _llm_type(self) -> str:
        return "echo"

    def _reply(self, messages: list[BaseMessage]) -> str:
        digest = hashlib.sha256("|".join(str(m.content) for m in messages).encode()).hexdigest()
        return f"{len(messages)} {digest[:4]} {digest[4:8]}"

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any
    ) -> ChatResult:
        return ChatResult(generations=[ChatGeneration(message=AIMessage(self._reply(messages)))])

    def _stream(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any
    ) -> Iterator[ChatGenerationChunk]:
        for i, word in enumerate(self._reply(messages).split(" ")):
            text = word if i == 0 else f" {word}"
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=text))
            if run_manager is not None:
                run_manager.on_llm_new_token(text, chunk=chunk)
            yield chunk


class State(TypedDict, total=False):
    topic: str
    drafts: Annotated[list[str], operator.add]
    notes: Annotated[list[str], operator.add]
    review: Annotated[list[str], operator.add]
    rounds: int


class Part(TypedDict):
    part: str


class Review(TypedDict, total=False):
    notes: list[str]
    review: Annotated[list[str], operator.add]


class ReviewOut(TypedDict):
    review: list[str]  # only what the subgraph adds goes back (the parent's reducers append)


def _review(ask: Any) -> Any:
    """The subgraph: critic -> editor."""
    sub = StateGraph(Review, output_schema=ReviewOut)
    sub.add_node("critic", lambda s: {"review": [ask("critic", s["notes"][-1])]})
    sub.add_node("editor", lambda s: {"review": [ask("editor", s["review"][-1])]})
    sub.add_edge(START, "critic")
    sub.add_edge("critic", "editor")
    sub.add_edge("editor", END)
    return sub.compile()


def build(model: BaseChatModel, rounds: int = 2) -> Any:
    """plan -(branch)-> research; research -> facts and -(Send x3)-> write; [write, facts] ->
    merge (join); merge -> revise, which loops until ``rounds``; then the review subgraph."""

    def ask(node: str, text: str) -> str:
        prompt = [("system", DOC), ("user", f"You are the {node}. {text}")]
        return str(model.invoke(prompt).content)

    def research(s: Any) -> dict[str, Any]:
        get_stream_writer()({"node": "research", "topic": s["topic"]})
        return {"notes": [ask("research", s["topic"])]}

    def revise(s: Any) -> dict[str, Any]:
        r = s.get("rounds", 0) + 1
        get_stream_writer()({"node": "revise", "round": r})
        return {"rounds": r, "notes": [ask("revise", f"{r} {s['notes'][-1]}")]}

    def again(s: State) -> Literal["revise", "review"]:
        return "revise" if s["rounds"] < rounds else "review"

    g = StateGraph(State)
    g.add_node("plan", lambda s: {"notes": [ask("plan", s["topic"])]})
    g.add_node("research", research)
    g.add_node("facts", lambda s: {"notes": [ask("facts", s["notes"][-1])]})
    g.add_node("write", lambda p: {"drafts": [ask("write", p["part"])]}, input_schema=Part)
    g.add_node("merge", lambda s: {"notes": [ask("merge", " ".join(sorted(s["drafts"])))]})
    g.add_node("revise", revise)
    g.add_node("review", _review(ask))
    g.add_edge(START, "plan")
    g.add_conditional_edges(
        "plan", lambda s: "go" if s["topic"] else "stop", {"go": "research", "stop": END}
    )
    g.add_edge("research", "facts")
    g.add_conditional_edges(
        "research", lambda s: [Send("write", {"part": f"{s['topic']} {i}"}) for i in range(3)]
    )
    g.add_edge(["write", "facts"], "merge")
    g.add_edge("merge", "revise")
    g.add_conditional_edges("revise", again)
    g.add_edge("review", END)
    return g.compile(checkpointer=InMemorySaver())


# ------------------------------------------------------------------ normalising runs
# Random by construction, so replaced: checkpoint ids (uuid6, from the clock), task ids (uuid5
# of the checkpoint id), LangChain run / message ids (uuid7) and checkpoint namespaces holding
# task ids; clock readings (debug ``timestamp``, kvshare's ``ttft_s`` and ``decode_tok_s``).
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_CLOCK = {"timestamp", "ttft_s", "decode_tok_s"}


def canon(obj: Any, drop: frozenset[str] = frozenset()) -> Any:
    """``obj`` as plain JSON data, without ids, clock readings or the keys in ``drop``."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump()
    if isinstance(obj, dict):
        skip = _CLOCK | drop
        return {_UUID.sub("<id>", str(k)): canon(v, drop) for k, v in obj.items() if k not in skip}
    if isinstance(obj, list | tuple):
        return [canon(v, drop) for v in obj]
    if isinstance(obj, str):
        return _UUID.sub("<id>", obj)
    if obj is None or isinstance(obj, int | float):
        return obj
    raise TypeError(f"no plain form for {type(obj).__name__}")  # never a repr with an address


def stream_run(app: Any, thread: str, drop: frozenset[str] = frozenset()) -> dict[str, Any]:
    """``app.stream`` in every mode (subgraphs too), compared superstep by superstep: tasks
    of one superstep run on a thread pool and finish in scheduling order, so the events up to
    each ``values`` event (a superstep's end) are compared as a sorted list; the streamed
    text of each model call (chunks joined in order) is compared too."""
    cfg = {"configurable": {"thread_id": thread}}
    steps: list[list[str]] = [[]]
    texts: dict[str, str] = defaultdict(str)
    node: dict[str, Any] = {}
    for ns, mode, data in app.stream(TOPIC, cfg, stream_mode=MODES, subgraphs=True):
        steps[-1].append(json.dumps(canon([ns, mode, data], drop), sort_keys=True))
        if mode == "messages":
            texts[data[0].id] += data[0].content
            node[data[0].id] = data[1]["langgraph_node"]
        if mode == "values":
            steps.append([])
    calls = sorted((node[i], t) for i, t in texts.items())
    return {
        "steps": [sorted(s) for s in steps],
        "calls": calls,
        "output": canon(app.get_state(cfg).values),
        "history": history(app, thread),
    }


def history(app: Any, thread: str) -> list[Any]:
    """``get_state_history``: values, next nodes, metadata and task names per checkpoint."""
    snaps = app.get_state_history({"configurable": {"thread_id": thread}})
    return [canon([s.values, s.next, s.metadata, [t.name for t in s.tasks]]) for s in snaps]


def events_run(app: Any, thread: str) -> dict[str, Any]:
    """``astream_events(version="v2")`` as (event, name, langgraph_node): the graph's own
    events in order, then each top-level task's events in order (grouped by the task's run,
    ``parent_ids[1]``), tasks sorted by superstep: concurrent tasks interleave in scheduling
    order."""

    async def collect() -> list[dict[str, Any]]:
        cfg = {"configurable": {"thread_id": thread}}
        return [e async for e in app.astream_events(TOPIC, cfg, version="v2")]

    root: list[tuple[Any, ...]] = []
    tasks: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    step: dict[str, int] = {}
    for e in asyncio.run(collect()):
        item = (e["event"], e["name"], e["metadata"].get("langgraph_node"))
        lineage = [*e["parent_ids"], e["run_id"]]
        if len(lineage) == 1:
            root.append(item)
            continue
        tasks[lineage[1]].append(item)
        step.setdefault(lineage[1], e["metadata"]["langgraph_step"])
    return {"root": root, "tasks": sorted((step[t], evs) for t, evs in tasks.items())}


# ------------------------------------------------------------------ tests
def test_a_wrapped_graph_streams_exactly_as_built(tiny_engine):
    engine = tiny_engine.fork()
    plain = build(Echo())
    wrapped = wrap(build(Echo()), engine)
    assert successors(engine, "critic") == ("editor",)  # registered, subgraph opened
    runs = [(stream_run(app, "s"), events_run(app, "e")) for app in (plain, wrapped)]
    assert runs[0] == runs[1]
    (stream, events), _ = runs
    out = stream["output"]
    assert len(out["drafts"]) == 3 and out["rounds"] == 2 and len(out["review"]) == 2
    assert len(stream["history"]) == 9  # input, __start__, 7 steps (the subgraph's: own ns)
    ran = [evs[0][1] for _, evs in events["tasks"]]
    assert sorted(ran) == sorted(
        ["plan", "research", "facts", "merge", "review"] + ["write"] * 3 + ["revise"] * 2
    )
    assert ("on_chat_model_start", "Echo", "editor") in events["tasks"][-1][1]  # inside review
    # sanity: the comparison sees a graph that differs by one loop round
    other = build(Echo(), rounds=3)
    assert stream_run(other, "s") != runs[0][0] and events_run(other, "e") != events


@pytest.mark.parametrize("mode", ["full", "prefix"])
def test_kvshare_models_run_the_same_wrapped_and_unwrapped(tiny_engine, mode):
    """``full``: everything equal but clock readings. ``prefix`` (exact reuse, but which
    parallel call hits the cache depends on scheduling): equal greedy outputs and streams
    once per-call usage figures are left out."""
    drop = frozenset() if mode == "full" else frozenset({"response_metadata", "usage_metadata"})
    engines = [tiny_engine.fork(mode=mode), tiny_engine.fork(mode=mode)]
    plain = build(ChatKVShare(engine=engines[0], max_tokens=3))
    wrapped = wrap(build(ChatKVShare(engine=engines[1], max_tokens=3)), engines[1])
    runs = [stream_run(app, "kv", drop) for app in (plain, wrapped)]
    assert runs[0] == runs[1]
    assert len(runs[0]["calls"]) == 11 and all(text for _, text in runs[0]["calls"])
    fps = [fingerprint(e) for e in engines]
    assert fps[0][3] == fps[1][3] and fps[0][5] == fps[1][5]  # learned state, calls logged
    assert fps[0][4][:2] == fps[1][4][:2]  # calls, prompt tokens (computed: scheduling)
    if mode == "prefix":
        assert engines[1].stats().prompt_tokens > engines[1].stats().computed_tokens  # reused
    else:
        assert fingerprint(engines[0]) == fingerprint(engines[1])
    assert engines[0].hints() == []
    by_node = {h.running: h.next for h in engines[1].hints("kv")}
    assert by_node["critic"] == ("editor",) and by_node["editor"] == ()
    assert by_node["revise"] == ("review", "revise") and by_node["merge"] == ("revise",)


def test_step_graph_opens_subgraph_nodes():
    app = build(Echo())
    for steps in (step_graph(app), step_graph(app.builder)):
        kind = {(a, b): d["kind"] for a, b, d in steps.edges(data=True)}
        assert {"critic", "editor"} <= set(steps)
        assert kind[("review", "critic")] == kind[("editor", END)] == "subgraph"
        assert kind[("critic", "editor")] == "edge" and kind[("review", END)] == "edge"
        assert kind[("revise", "revise")] == kind[("revise", "review")] == "branch"
        assert kind[("write", "merge")] == kind[("facts", "merge")] == "join"
        assert kind[("research", "write")] == "send" and kind[("research", "facts")] == "edge"
        assert (START, "critic") not in kind and ("critic", START) not in kind


def test_step_graph_nested_subgraphs_and_name_clashes():
    def graph(edges: list[tuple[str, str]], nodes: dict[str, Any]) -> Any:
        g = StateGraph(Part)
        for name, run in nodes.items():
            g.add_node(name, run)
        for a, b in edges:
            g.add_edge(a, b)
        return g.compile()

    def noop(s: Part) -> Part:
        return s

    inner = graph([(START, "deep"), ("deep", END)], {"deep": noop})
    # "a" and "outer" clash with parent node names; "mid" wraps the nested subgraph
    sub = graph(
        [(START, "a"), ("a", "mid"), ("mid", "outer"), ("outer", END)],
        {"a": noop, "mid": inner, "outer": noop},
    )
    top = graph(
        [(START, "a"), ("a", "outer"), ("outer", "z"), ("z", END)],
        {"a": noop, "outer": sub, "z": noop},
    )
    steps = step_graph(top)
    kind = {(a, b): d["kind"] for a, b, d in steps.edges(data=True)}
    assert set(steps) == {START, END, "a", "outer", "z", "mid", "deep"}
    assert kind[("a", "outer")] == "edge"  # the parent's edge, read first, keeps its kind
    assert kind[("outer", "a")] == "subgraph" and kind[("outer", "z")] == "edge"
    assert ("outer", "outer") not in kind  # the subgraph's exit "outer" -> "z": no self link
    assert kind[("mid", "deep")] == kind[("deep", "outer")] == "subgraph"  # nested
    assert kind[("a", "mid")] == "edge"


def _bad_graph(model: BaseChatModel, route: str) -> Any:
    """a -> (a route LangGraph cannot follow) ; b -> END."""

    def a(s: Any) -> dict[str, Any]:
        return {"notes": [str(model.invoke([("system", DOC), ("user", "Go.")]).content)]}

    g = StateGraph(State)
    g.add_node("a", a)
    g.add_node("b", lambda s: {"notes": ["b"]})
    g.add_edge(START, "a")
    if route == "unknown":  # no path_map: the target is not checked when compiling
        g.add_conditional_edges("a", lambda s: "nowhere")
    elif route == "unmapped":
        g.add_conditional_edges("a", lambda s: "nowhere", {"b": "b"})
    else:  # a loop with no way out
        g.add_conditional_edges("a", lambda s: "a", ["a", "b"])
    g.add_edge("b", END)
    return g.compile(checkpointer=InMemorySaver())


def _outcome(app: Any, caplog: pytest.LogCaptureFixture) -> tuple[Any, ...]:
    cfg = {"configurable": {"thread_id": "bad"}, "recursion_limit": 4}
    caplog.clear()
    try:
        result: Any = canon(app.invoke(TOPIC, cfg))
    except Exception as exc:  # the error is what is compared
        result = (type(exc), str(exc))
    logs = [(r.name, r.levelno, r.getMessage()) for r in caplog.records if r.name == "langgraph"]
    return result, logs, history(app, "bad")


@pytest.mark.parametrize("route", ["unknown", "unmapped", "endless"])
def test_bad_routes_end_the_same_wrapped_and_leave_the_engine_whole(tiny_engine, caplog, route):
    """LangGraph's own handling, unchanged by wrap: a route to an unknown node without a
    path_map is logged and dropped (the run ends there, no error); one missing from the
    path_map raises KeyError; an endless loop raises GraphRecursionError. The engine that ran
    the failed workflow holds what a plain one holds and keeps working."""
    caplog.set_level(logging.WARNING, logger="langgraph")
    engines = [tiny_engine.fork(), tiny_engine.fork()]
    plain = _bad_graph(ChatKVShare(engine=engines[0], max_tokens=3), route)
    wrapped = wrap(_bad_graph(ChatKVShare(engine=engines[1], max_tokens=3), route), engines[1])
    got = [_outcome(app, caplog) for app in (plain, wrapped)]
    assert got[0] == got[1]
    result, logs, _ = got[0]
    if route == "unknown":
        assert result["notes"] and logs and "unknown channel branch:to:nowhere" in logs[0][2]
    else:
        error = KeyError if route == "unmapped" else GraphRecursionError
        assert result[0] is error
    assert engines[1].hints("bad") and not engines[0].hints()
    assert fingerprint(engines[0]) == fingerprint(engines[1])
    cfg = engines[1].config.store
    for eng in engines:
        mem = eng.memory()
        assert (
            mem.prefix_cache <= cfg.prefix_cache_bytes and mem.segments <= cfg.segment_store_bytes
        )
        assert (
            mem.prefix_cache == eng.prefix_cache.bytes_used
            and mem.segments == eng.segments.bytes_used
        )
    after = [eng.chat([("user", "And now?")], max_new_tokens=3).text for eng in engines]
    assert after[0] == after[1] and fingerprint(engines[0]) == fingerprint(engines[1])
