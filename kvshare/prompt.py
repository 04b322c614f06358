"""Rendering chat messages into token ids with one segment per message."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvshare.errors import PromptError

ROLES = ("system", "user", "assistant", "tool")
_LANGCHAIN_TYPES = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool"}


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

    ids equal ``tokenizer.apply_chat_template(messages, add_generation_prompt=True)``.
    segments cover ``[0, tail.start)`` in order; ``tail`` is the generation prompt.
    """

    ids: tuple[int, ...]
    segments: tuple[Segment, ...]
    tail: Segment

    def __len__(self) -> int:
        return len(self.ids)


def token_hash(ids: Sequence[int]) -> str:
    """Content hash of a token sequence."""
    return hashlib.sha1(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()


def _one_message(i: int, msg: Any) -> dict[str, str]:
    if isinstance(msg, dict):
        if "role" not in msg or "content" not in msg:
            raise PromptError(f"message {i} must have 'role' and 'content' keys, got {sorted(msg)}")
        role, content = msg["role"], msg["content"]
    elif hasattr(msg, "type") and hasattr(msg, "content"):  # LangChain BaseMessage
        role = _LANGCHAIN_TYPES.get(msg.type, msg.type)
        content = msg.content
    else:
        raise PromptError(
            f"message {i} is a {type(msg).__name__}; pass dicts {{'role', 'content'}} or "
            f"LangChain message objects"
        )
    if role not in ROLES:
        raise PromptError(f"message {i} has unknown role {role!r}; use one of {', '.join(ROLES)}")
    if not isinstance(content, str):
        raise PromptError(
            f"message {i} content must be a string, got {type(content).__name__} "
            f"(multi-part content is not supported: join the text parts first)"
        )
    return {"role": role, "content": content}


def normalize(messages: Any) -> list[dict[str, str]]:
    """Validate ``messages`` and return plain ``{"role", "content"}`` dicts."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise PromptError("messages must be a list of messages, e.g. [{'role': 'user', ...}]")
    if len(messages) == 0:
        raise PromptError("messages is empty: pass at least one message")
    return [_one_message(i, m) for i, m in enumerate(messages)]


def _template(tokenizer: Any, msgs: list[dict[str, str]], gen: bool) -> str:
    text = tokenizer.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
    return str(text)


def _char_bounds(tokenizer: Any, msgs: list[dict[str, str]], full: str) -> list[int] | None:
    """Character offsets where each message ends in ``full``; None if not prefix-stable."""
    bounds = [0]
    for k in range(1, len(msgs) + 1):
        try:
            text = _template(tokenizer, msgs[:k], gen=False)
        except Exception:  # templates may reject partial conversations
            return None
        if not full.startswith(text) or len(text) < bounds[-1]:
            return None
        bounds.append(len(text))
    return bounds


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


def render(tokenizer: Any, messages: Any) -> Prompt:
    """Messages -> :class:`Prompt`. Raises :class:`PromptError` on bad input."""
    msgs = normalize(messages)
    try:
        full = _template(tokenizer, msgs, gen=True)
    except Exception as exc:  # jinja TemplateError raised by the model's own chat template
        raise PromptError(f"the model's chat template rejected these messages: {exc}") from exc
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = [int(i) for i in enc["input_ids"]]
    bounds = _char_bounds(tokenizer, msgs, full)
    if bounds is None:  # template is not prefix-stable: one segment for the whole conversation
        token_bounds = [0, len(ids)]
        roles = ["conversation"]
    else:
        token_bounds = _token_bounds(list(enc["offset_mapping"]), bounds)
        roles = [m["role"] for m in msgs]
    segments = []
    for i, role in enumerate(roles):
        start, end = token_bounds[i], token_bounds[i + 1]
        segments.append(Segment(start, end, role, i, token_hash(ids[start:end])))
    tail_start = token_bounds[-1]
    tail = Segment(tail_start, len(ids), "generation", -1, token_hash(ids[tail_start:]))
    return Prompt(tuple(ids), tuple(segments), tail)
