"""OpenAI chat requests to ``Engine.achat`` arguments, and engine results to OpenAI replies.

Tools and tool calls go through ``kvshare.integrations.tools`` (the same byte-stable tool
block and ``<tool_call>`` text that ``ChatKVShare`` uses), so an agent reaches the same KV
through the server as in process. Shapes follow OpenAI's chat-completions objects
(``chat.completion`` and ``chat.completion.chunk``).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_core.messages import ToolMessage as LCToolMessage

from kvshare.engine.results import ChatResult
from kvshare.integrations.tools import parse_calls, with_tools
from kvshare.serve.schema import ChatRequest, Message, UnsupportedError


def lc_message(i: int, m: Message) -> BaseMessage:
    """One OpenAI message as a LangChain message (tool-call arguments parsed from JSON)."""
    if m.role in ("system", "developer"):
        return SystemMessage(m.text())
    if m.role == "user":
        return HumanMessage(m.text())
    if m.role == "tool":
        return LCToolMessage(m.text(), tool_call_id=m.tool_call_id or "")
    calls = []
    for j, c in enumerate(m.tool_calls or ()):
        try:
            args = json.loads(c.function.arguments or "{}")
        except ValueError as exc:
            raise UnsupportedError(
                f"messages.{i}.tool_calls.{j}.function.arguments", f"not JSON: {exc}"
            ) from exc
        if not isinstance(args, dict):
            raise UnsupportedError(
                f"messages.{i}.tool_calls.{j}.function.arguments", "must be a JSON object"
            )
        calls.append({"name": c.function.name, "args": args, "id": c.id})
    return AIMessage(m.text(), tool_calls=calls)


def engine_messages(req: ChatRequest) -> list[Any]:
    """The request's messages as ``Engine.achat`` takes them, the tool block first when tools
    are given and ``tool_choice`` is not ``none``."""
    tools = [t.model_dump(exclude_none=True) for t in req.tools or ()]
    if req.tool_choice == "none":
        tools = []
    return with_tools([lc_message(i, m) for i, m in enumerate(req.messages)], tools)


def uses_tools(req: ChatRequest) -> bool:
    return bool(req.tools) and req.tool_choice != "none"


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(result: ChatResult) -> dict[str, Any]:
    """OpenAI usage; ``cached_tokens``: prompt tokens whose KV was reused (prefix hits and
    relocated tokens kept), and ``kvshare``: the call's own statistics."""
    s = result.stats
    stats = s.as_dict()
    stats.pop("stages", None)
    stats.pop("message_reuse", None)
    stats["relocated_runs"] = [list(r) for r in s.relocated_runs]
    return {
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.output_tokens,
        "total_tokens": s.prompt_tokens + s.output_tokens,
        "prompt_tokens_details": {"cached_tokens": s.prompt_tokens - s.computed_tokens},
        "kvshare": stats,
    }


def finish_reason(result: ChatResult, calls: list[Any]) -> str:
    """``tool_calls`` when the reply called tools, else the engine's reason (``context``
    ends like ``length``: the reply was cut)."""
    if calls:
        return "tool_calls"
    return "stop" if result.stats.finish_reason == "stop" else "length"


def reply_message(result: ChatResult, tools: bool) -> tuple[dict[str, Any], list[Any]]:
    """(OpenAI assistant message, parsed tool calls) of a finished call."""
    text, calls, _bad = parse_calls(result.text) if tools else (result.text, [], [])
    message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
    if calls:
        message["tool_calls"] = [
            {
                "id": c["id"],
                "type": "function",
                "function": {"name": c["name"], "arguments": json.dumps(c["args"])},
            }
            for c in calls
        ]
    return message, calls


def completion(result: ChatResult, model: str, tools: bool) -> dict[str, Any]:
    """The ``chat.completion`` object of a finished call."""
    message, calls = reply_message(result, tools)
    return {
        "id": completion_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": finish_reason(result, calls),
                "logprobs": None,
            }
        ],
        "usage": usage(result),
    }


def chunk(cid: str, model: str, delta: dict[str, Any], reason: str | None) -> dict[str, Any]:
    """One ``chat.completion.chunk`` with one choice."""
    return {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}],
    }


def tool_call_deltas(message: dict[str, Any]) -> list[dict[str, Any]]:
    """A whole reply's tool calls as stream deltas (one per call, indexed)."""
    return [{"index": i, **c} for i, c in enumerate(message.get("tool_calls", ()))]
