"""Tools for models whose chat template has no tools section (SmolLM2's among them).

The tool schemas go into the prompt as one byte-stable system message placed *first*, so
every agent bound to the same tools shares it as an exact prefix; a call is asked for as
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` and parsed back into LangChain
``tool_calls`` (malformed calls become ``invalid_tool_calls``, never an exception). Earlier
tool calls and tool results in the history are written in that same text form.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langchain_core.messages.tool import InvalidToolCall, ToolCall, invalid_tool_call, tool_call

_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
_HEADER = (
    "You can call tools. To call one, reply with exactly\n"
    '<tool_call>{"name": "<tool name>", "arguments": {<arguments as JSON>}}</tool_call>\n'
    "and nothing else. Available tools (JSON schema):\n"
)


def tool_schemas(tools: Sequence[Any]) -> list[dict[str, Any]]:
    """OpenAI tool dicts of functions, pydantic models, ``@tool``s or dicts (LangChain's
    conversion)."""
    from langchain_core.utils.function_calling import convert_to_openai_tool

    return [convert_to_openai_tool(t) for t in tools]


def tool_block(tools: Sequence[dict[str, Any]]) -> str:
    """The system-message text for ``tools`` (OpenAI tool dicts): byte-identical for the same
    tools in the same order (keys sorted, compact separators)."""
    lines = [json.dumps(t.get("function", t), sort_keys=True, separators=(",", ":")) for t in tools]
    return _HEADER + "\n".join(lines)


def format_call(name: str, args: dict[str, Any]) -> str:
    """One tool call in the text form the block asks for."""
    body = json.dumps({"name": name, "arguments": args}, sort_keys=True, separators=(",", ":"))
    return f"<tool_call>{body}</tool_call>"


def with_tools(messages: list[BaseMessage], tools: Sequence[dict[str, Any]]) -> list[Any]:
    """``messages`` for a template without tools: the tool block first, earlier tool calls
    written into the assistant text, tool results as ``tool`` messages."""
    out: list[Any] = [{"role": "system", "content": tool_block(tools)}] if tools else []
    for m in messages:
        if isinstance(m, AIMessage) and m.tool_calls:
            calls = "".join(format_call(c["name"], c["args"]) for c in m.tool_calls)
            out.append({"role": "assistant", "content": f"{m.text}{calls}"})
        elif isinstance(m, ToolMessage):
            out.append({"role": "tool", "content": m.text})
        else:
            out.append(m)
    return out


def parse_calls(text: str) -> tuple[str, list[ToolCall], list[InvalidToolCall]]:
    """(text outside the calls, parsed calls, malformed calls) of a model reply."""
    calls: list[ToolCall] = []
    bad: list[InvalidToolCall] = []
    for body in _CALL.findall(text):
        call_id = f"call_{uuid.uuid4().hex[:12]}"
        try:
            data = json.loads(body)
            name, args = data["name"], data.get("arguments", {})
            if not isinstance(name, str) or not isinstance(args, dict):
                raise TypeError("name must be a string and arguments an object")
        except (ValueError, KeyError, TypeError) as exc:
            bad.append(invalid_tool_call(name=None, args=body, id=call_id, error=str(exc)))
            continue
        calls.append(tool_call(name=name, args=args, id=call_id))
    return _CALL.sub("", text).strip() if (calls or bad) else text, calls, bad
