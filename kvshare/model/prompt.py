"""Rendering chat messages into token ids with one segment per message.

Accepted messages (see :func:`normalize`): ``{"role", "content"}`` dicts (optionally with
``tool_calls`` / ``tool_call_id``), ``(role, content)`` tuples, LangChain messages and
message chunks, and a LangChain ``PromptValue`` in place of the list. Where each message
starts is found in time linear in the messages (:mod:`kvshare.model.render_bounds`).
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kvshare.errors import PromptError
from kvshare.model.render_bounds import char_layout, template_text, tokenize

ROLES = ("system", "user", "assistant", "tool")
_ALIASES = {"human": "user", "ai": "assistant", **{r: r for r in ROLES}}


@dataclass(frozen=True)
class Segment:
    """One message's tokens: the half-open span ``[start, end)`` of the prompt ids.

    index: the message's index in the list (``-1`` for the generation-prompt tail).
    content_hash: sha1 of the span's token ids (what the segment store is keyed by).
    """

    start: int
    end: int
    role: str
    index: int
    content_hash: str

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Prompt:
    """Token ids of a rendered conversation, its message segments and the generation tail.

    ids equal ``tokenizer.apply_chat_template(messages, add_generation_prompt=True)``, except
    that special-token text inside content of a role outside ``special_roles`` is tokenized
    as plain text. segments cover ``[0, tail.start)`` in order; ``tail`` is the generation
    prompt.
    """

    ids: tuple[int, ...]
    segments: tuple[Segment, ...]
    tail: Segment

    def __len__(self) -> int:
        return len(self.ids)


def common_prefix(a: Iterable[int], b: Iterable[int]) -> int:
    """Number of leading tokens ``a`` and ``b`` share (iterators welcome: no slicing copies)."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def package_file(package: str, relative: str) -> Path | None:
    """``relative`` inside an installed (data) package, or None when absent."""
    spec = importlib.util.find_spec(package)
    for loc in list(spec.submodule_search_locations or []) if spec else []:
        path = Path(loc) / relative
        if path.is_file():
            return path
    return None


def token_hash(ids: Sequence[int]) -> str:
    """Content hash of a token sequence."""
    return hashlib.sha1(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()


def _role(i: int, role: Any) -> str:
    """The standard role for ``role`` (``human`` -> user, ``ai`` -> assistant)."""
    if not isinstance(role, str):
        raise PromptError(f"message {i} role must be a str, got {type(role).__name__}")
    if role not in _ALIASES:
        raise PromptError(
            f"message {i} has unknown role {role!r}; use one of {', '.join(ROLES)} "
            f"(or 'human' / 'ai')"
        )
    return _ALIASES[role]


def _checked_text(i: int, content: Any) -> str:
    """``content`` if it is a str that encodes as UTF-8."""
    if not isinstance(content, str):
        raise PromptError(
            f"message {i} content must be a string, got {type(content).__name__} "
            f"(multi-part content: join the text parts first)"
        )
    try:
        content.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PromptError(
            f"message {i} content is not valid Unicode text ({exc.reason} at position "
            f"{exc.start}, e.g. a lone surrogate): decode the source bytes properly"
        ) from None
    return content


def _parts_text(i: int, content: Any) -> str:
    """LangChain content: a str, or a list of text parts joined like ``BaseMessage.text``."""
    if not isinstance(content, list):
        return _checked_text(i, content)
    texts = []
    for part in content:
        if isinstance(part, dict) and part.get("type") == "text":
            part = part.get("text")
        elif not isinstance(part, str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise PromptError(
                f"message {i} has a {kind!r} content part; only text can be rendered for "
                f"this text-only model: remove it or describe it in text"
            )
        texts.append(_checked_text(i, part))
    return "".join(texts)


def _tool_calls(i: int, calls: Any) -> list[dict[str, Any]]:
    """Tool calls in the OpenAI / Hugging Face format (LangChain ``{name, args, id}`` too)."""
    if not isinstance(calls, (list, tuple)) or not all(isinstance(c, dict) for c in calls):
        raise PromptError(f"message {i} tool_calls must be a list of dicts")
    out = []
    for call in calls:
        if "function" not in call and "name" in call:  # LangChain ToolCall
            fn = {"name": call["name"], "arguments": call.get("args", {})}
            call = {"type": "function", "function": fn, "id": call.get("id")}
        if not isinstance(call.get("function"), dict):
            raise PromptError(
                f"message {i} has a tool call without a 'function': use "
                f"{{'type': 'function', 'function': {{'name': ..., 'arguments': {{...}}}}}}"
            )
        out.append(dict(call))
    return out


def _message(role: str, content: str, calls: Any, call_id: Any, i: int) -> dict[str, Any]:
    """A normalized message dict; tool fields only when present."""
    msg: dict[str, Any] = {"role": role, "content": content}
    if calls:
        msg["tool_calls"] = _tool_calls(i, calls)
    if call_id is not None:
        if not isinstance(call_id, str):
            raise PromptError(f"message {i} tool_call_id must be a str, got {call_id!r}")
        msg["tool_call_id"] = call_id
    return msg


def _from_langchain(i: int, msg: Any) -> dict[str, Any]:
    """A LangChain message or chunk (``.type`` like ``"ai"`` or ``"AIMessageChunk"``)."""
    kind = str(msg.type)
    if kind.endswith("MessageChunk"):
        kind = kind[: -len("MessageChunk")].lower()
    role = _role(i, msg.role if kind == "chat" else kind)
    calls = getattr(msg, "tool_calls", None) if role == "assistant" else None
    call_id = getattr(msg, "tool_call_id", None) if role == "tool" else None
    return _message(role, _parts_text(i, msg.content), calls, call_id, i)


def _one_message(i: int, msg: Any) -> dict[str, Any]:
    """One message of any accepted kind as a normalized dict."""
    if isinstance(msg, dict):
        calls = msg.get("tool_calls")
        if "role" not in msg or ("content" not in msg and not calls):
            raise PromptError(f"message {i} must have 'role' and 'content' keys, got {sorted(msg)}")
        content = msg.get("content")
        content = "" if content is None and calls else _checked_text(i, content)
        return _message(_role(i, msg["role"]), content, calls, msg.get("tool_call_id"), i)
    if isinstance(msg, tuple) and len(msg) == 2:  # LangChain ("human", "hi")
        return _message(_role(i, msg[0]), _parts_text(i, msg[1]), None, None, i)
    if hasattr(msg, "type") and hasattr(msg, "content"):
        return _from_langchain(i, msg)
    raise PromptError(
        f"message {i} is a {type(msg).__name__}; pass dicts {{'role', 'content'}}, "
        f"(role, content) tuples or LangChain message objects"
    )


def normalize(messages: Any) -> list[dict[str, Any]]:
    """Validate ``messages`` and return ``{"role", "content"}`` dicts.

    A dict also carries ``tool_calls`` (non-empty list, OpenAI/HF format) and
    ``tool_call_id`` where the message had them; other keys (``name`` ...) are dropped.
    Roles come back standard (``user``, ``assistant``, ``system``, ``tool``).
    """
    if hasattr(messages, "to_messages") and not isinstance(messages, Sequence):
        messages = messages.to_messages()  # LangChain PromptValue
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise PromptError(
            f"messages must be a list of messages (or a LangChain PromptValue), got "
            f"{type(messages).__name__}, e.g. [{{'role': 'user', 'content': 'hi'}}]"
        )
    if len(messages) == 0:
        raise PromptError("messages is empty: pass at least one message")
    return [_one_message(i, m) for i, m in enumerate(messages)]


def _for_template(tokenizer: Any, msgs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as the chat template gets them: tool fields only if it renders tool calls."""
    if "tool_calls" in str(getattr(tokenizer, "chat_template", None) or ""):
        return msgs
    for i, m in enumerate(msgs):
        if m.get("tool_calls"):
            raise PromptError(
                f"message {i} has tool calls, but this model's chat template cannot render "
                f"tool calls; use a model whose template supports tools, or write the calls "
                f"into the message content"
            )
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def _token_bounds(offsets: list[tuple[int, int]], char_bounds: list[int]) -> list[int]:
    """First token index whose text starts at or after each character bound."""
    starts = [o[0] for o in offsets]
    result = []
    t = 0
    for cb in char_bounds:
        while t < len(starts) and starts[t] < cb:
            t += 1
        result.append(t)
    return result


def _trusted(special_roles: Any) -> frozenset[str]:
    """``special_roles`` checked: a collection of standard role names."""
    if isinstance(special_roles, str) or not isinstance(special_roles, Collection):
        raise PromptError(
            f"special_roles must be a collection of roles such as ('system',), "
            f"got {special_roles!r}"
        )
    bad = [r for r in special_roles if not isinstance(r, str) or r not in ROLES]
    if bad:
        raise PromptError(f"special_roles has unknown role {bad[0]!r}; use {', '.join(ROLES)}")
    return frozenset(special_roles)


def render(tokenizer: Any, messages: Any, special_roles: Collection[str] = ("system",)) -> Prompt:
    """Messages -> :class:`Prompt`. Raises :class:`PromptError` on bad input.

    special_roles: roles whose content may contain control tokens (``<|im_start|>`` ...);
    in every other role's content such text is tokenized as plain text.
    """
    trusted = _trusted(special_roles)
    msgs = _for_template(tokenizer, normalize(messages))
    try:
        full = template_text(tokenizer, msgs, gen=True)
    except Exception as exc:  # jinja TemplateError raised by the model's own chat template
        raise PromptError(f"the model's chat template rejected these messages: {exc}") from exc
    try:
        full.encode("utf-8")
    except UnicodeEncodeError:
        raise PromptError(
            "a tool call's name or arguments are not valid Unicode text (e.g. a lone "
            "surrogate): decode the source bytes properly"
        ) from None
    lay = char_layout(tokenizer, msgs, full)
    guarded = [i for i, m in enumerate(msgs) if m["role"] not in trusted and m["content"]]
    ids, offsets = tokenize(tokenizer, lay, msgs, guarded)
    if lay.bounds is None:  # template is not prefix-stable: one segment for the conversation
        token_bounds, roles = [0, len(ids)], ["conversation"]
    else:
        token_bounds, roles = _token_bounds(offsets, lay.bounds), [m["role"] for m in msgs]
    segments = []
    for i, role in enumerate(roles):
        start, end = token_bounds[i], token_bounds[i + 1]
        segments.append(Segment(start, end, role, i, token_hash(ids[start:end])))
    tail_start = token_bounds[-1]
    tail = Segment(tail_start, len(ids), "generation", -1, token_hash(ids[tail_start:]))
    return Prompt(tuple(ids), tuple(segments), tail)
