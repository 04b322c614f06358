"""ChatKVShare: a LangChain chat model over an Engine, alone and inside a LangGraph graph."""

from __future__ import annotations

from typing import TypedDict

import pytest
from kvshare.integrations.langchain import ChatKVShare
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

from kvshare.errors import PromptError

from factories import DOC, team


def test_invoke_equals_engine_chat_and_reports_reuse(tiny_engine):
    msgs = [SystemMessage("You are the planner."), HumanMessage(DOC)]
    direct = tiny_engine.fork(mode="prefix").chat(msgs, max_new_tokens=6)
    model = ChatKVShare(engine=tiny_engine.fork(mode="prefix"), max_tokens=6)
    first, again = model.invoke(msgs), model.invoke(msgs)
    assert isinstance(first, AIMessage) and first.content == direct.text
    assert first.usage_metadata is not None and again.usage_metadata is not None
    assert first.usage_metadata["input_token_details"]["cache_read"] == 0
    s = model.engine.calls[-1]
    assert (
        again.usage_metadata["input_token_details"]["cache_read"]
        == (s.prompt_tokens - s.computed_tokens)
        > 0
    )  # the second call reuses the first one's prefix
    assert again.response_metadata["prefix_hit_tokens"] == s.prefix_hit_tokens
    assert again.response_metadata["mode"] == "prefix"


def test_stream_concatenates_to_invoke_with_and_without_a_stop_string(tiny_engine):
    msgs = team("critic")
    model = ChatKVShare(engine=tiny_engine.fork(mode="full"), max_tokens=16)
    whole = str(model.invoke(msgs).content)
    chunks = list(model.stream(msgs))
    assert "".join(str(c.content) for c in chunks) == whole
    assert chunks[-1].usage_metadata is not None and len(chunks) >= 2
    stop = whole[len(whole) // 2 : len(whole) // 2 + 3]  # text the model really produces
    assert len(stop) == 3
    cut = str(model.invoke(msgs, stop=[stop]).content)
    assert cut == whole[: whole.find(stop)]
    assert "".join(str(c.content) for c in model.stream(msgs, stop=[stop])) == cut


def test_async_invoke_and_stream_are_native_and_equal_the_sync_ones(tiny_engine):
    """ainvoke/astream go through Engine.achat: same text as invoke/stream (stop strings
    included), several at once share the engine's decode batch, and no thread is started
    per call (LangChain's default would run each in an executor thread)."""
    import asyncio
    import threading

    msgs = team("critic")
    model = ChatKVShare(engine=tiny_engine.fork(mode="full"), max_tokens=16)
    whole = str(model.invoke(msgs).content)
    stop = whole[len(whole) // 2 : len(whole) // 2 + 3]
    cut = str(model.invoke(msgs, stop=[stop]).content)
    before = threading.active_count()

    async def main():
        async def streamed(**kw):
            return [str(c.content) async for c in model.astream(msgs, **kw)]

        replies = await asyncio.gather(*(model.ainvoke(msgs) for _ in range(3)),
                                       streamed(), streamed(stop=[stop]))  # fmt: skip
        return replies, threading.active_count()

    (a, b, c, chunks, cut_chunks), during = asyncio.run(main())
    assert [str(m.content) for m in (a, b, c)] == [whole] * 3
    assert "".join(chunks) == whole and len(chunks) >= 2 and "".join(cut_chunks) == cut
    assert during == before
    assert model.engine.batcher.stats()["mean_batch"] > 1


def test_bad_messages_raise_kvshare_errors(tiny_engine):
    model = ChatKVShare(engine=tiny_engine.fork(mode="prefix"), max_tokens=2)
    with pytest.raises(PromptError):
        model.invoke([])
    with pytest.raises(PromptError):
        list(model.stream([]))  # raised from the worker thread, in the caller
    assert len(model.engine.calls) == 0


class _State(TypedDict):
    notes: list[str]


def test_graph_nodes_are_agents_and_threads_are_sessions(tiny_engine):
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.graph import END, START, StateGraph

    model = ChatKVShare(engine=tiny_engine.fork(mode="kvshare"), max_tokens=4)

    def node(role: str):
        def run(state: _State) -> _State:
            reply = model.invoke(team(role, extra=[{"role": "user", "content": "Go."}]))
            return {"notes": [*state["notes"], str(reply.content)]}

        return run

    g = StateGraph(_State)
    for role in ("planner", "critic"):
        g.add_node(role, node(role))
    g.add_edge(START, "planner")
    g.add_edge("planner", "critic")
    g.add_edge("critic", END)
    app = g.compile(checkpointer=InMemorySaver())
    out = app.invoke({"notes": []}, {"configurable": {"thread_id": "run-1"}})
    assert len(out["notes"]) == 2
    calls = model.engine.calls
    assert [(c.agent, c.session) for c in calls] == [("planner", "run-1"), ("critic", "run-1")]
    assert calls[1].relocated_tokens + calls[1].prefix_hit_tokens > 0  # the shared document


def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


def test_tool_calls_round_trip_and_malformed_ones_are_contained():
    from kvshare.integrations.tools import format_call, parse_calls

    reply = "Let me check. " + format_call("get_weather", {"city": "Paris"})
    text, calls, bad = parse_calls(reply)
    assert text == "Let me check." and not bad
    assert [(c["name"], c["args"]) for c in calls] == [("get_weather", {"city": "Paris"})]
    text, calls, bad = parse_calls('<tool_call>{"name": 3}</tool_call><tool_call>{oops</tool_call>')
    assert not calls and len(bad) == 2 and all(b["error"] for b in bad)
    assert parse_calls("no calls here") == ("no calls here", [], [])


def test_bound_tools_share_one_prefix_and_history_renders(tiny_engine):
    from kvshare.integrations.tools import tool_block
    from langchain_core.messages import ToolMessage

    from kvshare.errors import ConfigError

    model = ChatKVShare(engine=tiny_engine.fork(mode="prefix"), max_tokens=3)
    llm = model.bind_tools([get_weather])
    for role in ("planner", "critic"):  # different system prompts, same tools
        llm.invoke([SystemMessage(f"You are the {role}."), HumanMessage("Weather in Paris?")])
    block = len(tiny_engine.tokenizer(tool_block([convert(get_weather)]))["input_ids"])
    assert model.engine.calls[1].prefix_hit_tokens >= block  # the tool block is shared
    history = [
        HumanMessage("Weather in Paris?"),
        AIMessage("", tool_calls=[{"name": "get_weather", "args": {"city": "Paris"}, "id": "1"}]),
        ToolMessage("sunny in Paris", tool_call_id="1"),
    ]
    assert isinstance(llm.invoke(history), AIMessage)  # rendered as text, not refused
    with pytest.raises(ConfigError, match="constrained decoding"):
        model.bind_tools([get_weather], tool_choice="any")
    assert model.bind_tools([get_weather], tool_choice="none").kwargs["tools"] == []


def convert(fn):
    from langchain_core.utils.function_calling import convert_to_openai_tool

    return convert_to_openai_tool(fn)


class _Scripted:
    """An engine stand-in whose replies are scripted (to test parsing of real tool calls)."""

    def __init__(self, engine, reply: str) -> None:
        self._engine, self.reply = engine, reply
        self.loaded, self.config, self.tokenizer = engine.loaded, engine.config, engine.tokenizer

    def chat(self, messages, **kwargs):
        import dataclasses

        r = self._engine.chat(messages, max_new_tokens=1)
        return dataclasses.replace(r, text=self.reply)


def test_a_reply_with_a_tool_call_becomes_tool_calls(tiny_engine):
    from kvshare.integrations.tools import format_call

    reply = format_call("get_weather", {"city": "Oslo"})
    model = ChatKVShare(engine=_Scripted(tiny_engine.fork(mode="full"), reply))
    msg = model.bind_tools([get_weather]).invoke([HumanMessage("Weather in Oslo?")])
    assert msg.content == "" and msg.tool_calls[0]["args"] == {"city": "Oslo"}
    chunks = list(model.bind_tools([get_weather]).stream([HumanMessage("Weather in Oslo?")]))
    assert chunks[-1].tool_call_chunks[0]["name"] == "get_weather"


def test_structured_output_validates_and_retries_then_fails_clearly(tiny_engine):
    from kvshare.integrations.tools import format_call
    from pydantic import BaseModel

    from kvshare.errors import StructuredOutputError

    class City(BaseModel):
        name: str
        population: int

    good = format_call("City", {"name": "Oslo", "population": 700000})
    model = ChatKVShare(engine=_Scripted(tiny_engine.fork(mode="full"), good))
    city = model.with_structured_output(City).invoke("Tell me about Oslo.")
    assert city == City(name="Oslo", population=700000)
    raw = model.with_structured_output(City, include_raw=True).invoke("Oslo?")
    assert raw["parsed"] == city and raw["parsing_error"] is None

    bad = _Scripted(tiny_engine.fork(mode="full"), format_call("City", {"name": "Oslo"}))
    calls = []
    original = bad.chat
    bad.chat = lambda messages, **kw: calls.append(kw) or original(messages, **kw)  # type: ignore[method-assign]
    with pytest.raises(StructuredOutputError, match="population"):
        ChatKVShare(engine=bad).with_structured_output(City, retries=2).invoke("Oslo?")
    assert len(calls) == 3 and calls[1]["temperature"] == 0.7 and calls[2]["seed"] == 1


def test_wrapper_cost_bench(tiny_engine, capsys):
    from kvshare.bench.wrapper import measure

    cost = measure(tiny_engine, calls=3)
    assert set(cost) == {"engine_chat_ms", "chat_kvshare_ms", "overhead_ms"}
    assert cost["engine_chat_ms"] > 0 and cost["chat_kvshare_ms"] > 0
    assert cost["overhead_ms"] == pytest.approx(cost["chat_kvshare_ms"] - cost["engine_chat_ms"])
