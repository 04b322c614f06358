"""``POST /v1/chat/completions``: one request to one ``Engine.achat`` call, whole or streamed.

Order of checks, each answered before anything touches the engine: the API key (401), the
body (400 naming the field), unsupported fields (400), the model name (404), ``max_tokens``
over the cap (400), the tenant's limits (429). The engine's own validation (ContextLengthError
and the like) raises before its call touches a store; a streamed reply's headers are sent
only with its first text, so those are real 4xx answers too. Errors after that end the stream
with an OpenAI error event. A client that goes away cancels its call: the engine frees the
call's decode row at its next step and stores nothing of it.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from functools import partial
from typing import Any

from kvshare.engine.results import ChatResult
from kvshare.errors import KVShareError
from kvshare.integrations.replies import astream_texts
from kvshare.sched.hints import make_hint
from kvshare.serve import convert
from kvshare.serve.errors import ServeError, body, classify
from kvshare.serve.limits import Slot
from kvshare.serve.schema import ChatRequest, check_supported


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the tenant (from its key), agent and session (from the request)."""

    tenant: str
    agent: str | None
    session: str | None


def caller(tenant: str, req: ChatRequest, headers: Any) -> Caller:
    """Agent and session: ``X-KVShare-Agent``/``-Session`` headers, else ``metadata``
    (``kvshare_agent``, ``kvshare_session``), else ``user`` (agent) and ``prompt_cache_key``
    (session). The tenant is never read from the request."""
    meta = req.metadata or {}
    agent = headers.get("x-kvshare-agent") or meta.get("kvshare_agent") or req.user
    session = (
        headers.get("x-kvshare-session") or meta.get("kvshare_session") or req.prompt_cache_key
    )
    return Caller(tenant, agent or None, session or None)


def call_args(state: Any, req: ChatRequest, who: Caller) -> dict[str, Any]:
    """``Engine.achat``'s arguments (messages included); ServeError/UnsupportedError first."""
    check_supported(req)
    if req.model != state.model_id:
        raise ServeError(
            404, f"model {req.model!r} is not served here; this server serves "
            f"{state.model_id!r} (GET /v1/models)", "model", "model_not_found",
        )  # fmt: skip
    default = min(state.config.default_max_tokens, state.max_tokens_cap)
    asked = req.max_completion_tokens or req.max_tokens or default
    if asked > state.max_tokens_cap:
        name = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        raise ServeError(
            400, f"{name}={asked} exceeds this server's cap of {state.max_tokens_cap}",
            name, "invalid_value",
        )  # fmt: skip
    return {
        "messages": convert.engine_messages(req),
        "agent": who.agent,
        "session": who.session,
        "tenant": who.tenant,
        "max_new_tokens": asked,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "stop": req.stop or None,
        "seed": req.seed,
    }


def prompt_estimate(req: ChatRequest) -> int:
    """The request's prompt tokens for the queue budget, estimated without the tokenizer
    (which the engine's threads may be using): UTF-8 bytes / 4 plus 8 per message for the
    template. The engine counts exactly; this only bounds what a tenant has in flight."""
    size = sum(len(m.text().encode()) for m in req.messages)
    return size // 4 + 8 * len(req.messages)


def next_hint(state: Any, req: ChatRequest, who: Caller) -> Callable[[], None] | None:
    """``metadata.kvshare_next`` (comma-separated agents) as a workflow hint (this agent runs
    now, those next), checked now and given to the engine by the returned callable (at the
    call's first token, so a refused call leaves no hint); None without one."""
    nexts = (req.metadata or {}).get("kvshare_next")
    if nexts is None:
        return None
    names = [n.strip() for n in nexts.split(",") if n.strip()]
    try:
        make_hint(who.session, who.agent, names, (), None, who.tenant)
    except KVShareError as exc:
        raise ServeError(400, f"kvshare_next: {exc}", "metadata.kvshare_next") from exc
    session = who.session
    assert session is not None
    return partial(state.engine.hint, session, running=who.agent, next=names, tenant=who.tenant)


async def whole(state: Any, req: ChatRequest, args: dict[str, Any], slot: Slot) -> dict:
    """The ``chat.completion`` of one call (the slot released however it ends)."""
    t0 = time.perf_counter()
    try:
        result = await state.engine.achat(**args, on_token=slot.started)
    finally:
        slot.release()
    state.metrics.observe_call(result, time.perf_counter() - t0)
    return convert.completion(result, state.model_id, convert.uses_tools(req))


def sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


async def streamed(
    state: Any, req: ChatRequest, args: dict[str, Any], slot: Slot
) -> AsyncGenerator[bytes, None]:
    """The SSE events of one call. Its first event waits for the first text, and errors
    until then propagate (the caller awaits that event before the response starts: plain
    4xx/5xx answers); later errors end the stream with an OpenAI error event."""
    cid, model, t0 = convert.completion_id(), state.model_id, time.perf_counter()
    done: list[ChatResult] = []
    started = False
    try:
        if convert.uses_tools(req):  # a tool reply comes whole, once its calls are parsed
            done.append(await state.engine.achat(**args, on_token=slot.started))
            started = True
            yield sse(convert.chunk(cid, model, tool_delta(done[0]), None))
        else:
            async with aclosing(astream_texts(state.engine, args, done)) as texts:
                sent = ""
                async for text in texts:
                    slot.started()
                    if not started:
                        started = True
                        yield sse(convert.chunk(cid, model, {"role": "assistant"}, None))
                    if len(text) > len(sent):
                        yield sse(convert.chunk(cid, model, {"content": text[len(sent) :]}, None))
                        sent = text
            if not started:
                started = True
                yield sse(convert.chunk(cid, model, {"role": "assistant"}, None))
            rest = done[0].text[len(sent) :] if done[0].text.startswith(sent) else ""
            if rest:
                yield sse(convert.chunk(cid, model, {"content": rest}, None))
    except Exception as exc:
        if not started:
            raise
        err = classify(exc)
        yield sse(body(err.status, str(err), err.param, err.code))
        return
    finally:
        slot.release()
    async for event in ending(state, req, done[0], cid, t0):
        yield event


def tool_delta(result: ChatResult) -> dict[str, Any]:
    """A whole tool-path reply as one delta (text and indexed tool calls)."""
    message, _ = convert.reply_message(result, True)
    delta = {"role": "assistant", "content": message["content"]}
    if "tool_calls" in message:
        delta["tool_calls"] = convert.tool_call_deltas(message)
    return delta


async def ending(
    state: Any, req: ChatRequest, result: ChatResult, cid: str, t0: float
) -> AsyncGenerator[bytes, None]:
    """A stream's last events: the finish reason, usage when asked for, ``[DONE]``."""
    state.metrics.observe_call(result, time.perf_counter() - t0)
    model = state.model_id
    _, calls = convert.reply_message(result, convert.uses_tools(req))
    yield sse(convert.chunk(cid, model, {}, convert.finish_reason(result, calls)))
    if req.stream_options is not None and req.stream_options.include_usage:
        last = convert.chunk(cid, model, {}, None)
        last["choices"], last["usage"] = [], convert.usage(result)
        yield sse(last)
    yield sse("[DONE]")
