"""Real clients against a real server: the openai SDK (sync, async, streaming, tools) and
replies equal to ``Engine.chat`` called directly."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest

from factories import DOC, team
from serving import served

TOOL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Look a word up.",
        "parameters": {"type": "object", "properties": {"word": {"type": "string"}}},
    },
}


def sdk(server, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key=key, max_retries=0, timeout=60)


@pytest.mark.parametrize("mode", ["prefix", "full"])
def test_sync_replies_equal_engine_chat_and_report_reuse(tiny_engine, mode):
    msgs = team("planner")
    direct = tiny_engine.fork(mode=mode).chat(msgs, max_new_tokens=8)
    with served(tiny_engine.fork(mode=mode)) as server:
        client = sdk(server)
        model = server.state.model_id
        first = client.chat.completions.create(
            model=model, messages=msgs, max_tokens=8, temperature=0
        )
        again = client.chat.completions.create(
            model=model, messages=msgs, max_completion_tokens=8, temperature=0
        )
    assert first.choices[0].message.content == direct.text == again.choices[0].message.content
    assert first.choices[0].finish_reason == ("length" if len(direct.tokens) == 8 else "stop")
    assert first.usage.prompt_tokens == direct.stats.prompt_tokens
    assert first.usage.completion_tokens == len(direct.tokens)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = again.usage.prompt_tokens_details.cached_tokens
    stats = again.usage.model_extra["kvshare"]
    assert cached == stats["prefix_hit_tokens"] + stats["relocated_tokens"]
    assert stats["mode"] == mode and stats["tenant"] == "local"
    assert (cached > 0) == (mode == "prefix")  # full mode reuses nothing


def test_stream_concatenates_to_the_whole_reply_with_usage_last(tiny_server):
    client, model = sdk(tiny_server), tiny_server.state.model_id
    msgs = team("critic")
    whole = client.chat.completions.create(model=model, messages=msgs, max_tokens=12, seed=3)
    chunks = list(
        client.chat.completions.create(
            model=model, messages=msgs, max_tokens=12, seed=3, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content  # same seed: same sampled tokens
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert len({c.id for c in chunks}) == 1
    no_usage = list(
        client.chat.completions.create(model=model, messages=msgs, max_tokens=3, stream=True)
    )
    assert all(c.usage is None for c in no_usage) and no_usage[-1].choices[0].finish_reason


def test_async_clients_run_at_once_and_equal_the_serial_replies(tiny_server):
    model = tiny_server.state.model_id
    prompts = [team(role) for role in ("planner", "critic", "writer", "judge")]
    serial = [
        sdk(tiny_server).chat.completions.create(
            model=model, messages=m, max_tokens=6, temperature=0
        ).choices[0].message.content
        for m in prompts
    ]  # fmt: skip

    async def run() -> list[str | None]:
        client = openai.AsyncOpenAI(base_url=f"{tiny_server.base}/v1", api_key="x", timeout=60)
        replies = await asyncio.gather(
            *(client.chat.completions.create(model=model, messages=m, max_tokens=6,
                                             temperature=0) for m in prompts)
        )  # fmt: skip
        return [r.choices[0].message.content for r in replies]

    assert asyncio.run(run()) == serial


def test_tool_calls_and_tool_results_round_trip(tiny_server, monkeypatch):
    """A reply that calls a tool comes back as OpenAI tool_calls (finish_reason tool_calls,
    whole and streamed); a history with a tool call and its result is accepted and renders
    as ChatKVShare renders it (the tool block first: an exact prefix for the next call)."""
    client, model = sdk(tiny_server), tiny_server.state.model_id
    call = '<tool_call>{"name": "lookup", "arguments": {"word": "ledger"}}</tool_call>'
    engine = tiny_server.state.engine
    real = engine.achat

    async def scripted(messages, **kw):
        result = await real(messages, **kw)
        return type(result)(call, result.tokens, result.stats)

    monkeypatch.setattr(engine, "achat", scripted)
    msgs = [{"role": "user", "content": "What is a ledger?"}]
    reply = client.chat.completions.create(model=model, messages=msgs, tools=[TOOL], max_tokens=4)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (tc,) = choice.message.tool_calls
    assert tc.function.name == "lookup" and json.loads(tc.function.arguments) == {"word": "ledger"}
    chunks = list(
        client.chat.completions.create(
            model=model, messages=msgs, tools=[TOOL], max_tokens=4, stream=True
        )
    )
    (delta_call,) = chunks[0].choices[0].delta.tool_calls
    assert delta_call.function.name == "lookup" and chunks[-1].choices[0].finish_reason == (
        "tool_calls"
    )
    monkeypatch.setattr(engine, "achat", real)
    history = [
        *msgs,
        {"role": "assistant", "content": None, "tool_calls": [tc.model_dump()]},
        {"role": "tool", "tool_call_id": tc.id, "content": "a book of accounts"},
    ]
    follow = client.chat.completions.create(
        model=model, messages=history, tools=[TOOL], max_tokens=4, temperature=0
    )
    stats = follow.usage.model_extra["kvshare"]
    assert stats["prefix_hit_tokens"] > 0  # the tool block and the question: a prefix hit
    none = client.chat.completions.create(
        model=model, messages=history, tools=[TOOL], tool_choice="none", max_tokens=4
    )
    assert none.usage.prompt_tokens < follow.usage.prompt_tokens  # no tool block


def test_models_lists_the_served_model(tiny_server):
    (entry,) = sdk(tiny_server).models.list().data
    assert entry.id == tiny_server.state.model_id and entry.owned_by == "kvshare"


def test_agent_and_session_come_from_headers_metadata_or_openai_fields(tiny_server):
    client, model = sdk(tiny_server), tiny_server.state.model_id
    engine = tiny_server.state.engine
    msgs = [{"role": "user", "content": DOC}]
    ways = [
        ({"extra_headers": {"X-KVShare-Agent": "a1", "X-KVShare-Session": "s1"}}, ("a1", "s1")),
        ({"metadata": {"kvshare_agent": "a2", "kvshare_session": "s2"}}, ("a2", "s2")),
        ({"user": "a3", "prompt_cache_key": "s3"}, ("a3", "s3")),
    ]
    for extra, (agent, session) in ways:
        client.chat.completions.create(model=model, messages=msgs, max_tokens=2, **extra)
        last = engine.calls[-1]
        assert (last.agent, last.session, last.tenant) == (agent, session, "local")
