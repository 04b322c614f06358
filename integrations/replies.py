"""Engine results as LangChain replies: usage and response metadata, a whole reply as one
stream chunk, ``TokenStream`` (one ``Engine.chat`` on a worker thread, its text as it grows)
for ``ChatKVShare._stream`` and ``astream_texts`` (one ``Engine.achat`` on the event loop) for
``ChatKVShare._astream``."""

from __future__ import annotations

import asyncio
import json
import queue
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from kvshare.integrations.tools import parse_calls
from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.tool import tool_call_chunk

from kvshare.engine.engine import ChatResult as KVResult


def as_chunk(message: AIMessage) -> AIMessageChunk:
    """A whole reply as one last chunk (tool calls as tool-call chunks)."""
    chunks = [
        tool_call_chunk(name=c["name"], args=json.dumps(c["args"]), id=c["id"], index=i)
        for i, c in enumerate(message.tool_calls)
    ]
    return AIMessageChunk(
        content=message.content,
        tool_call_chunks=chunks,
        usage_metadata=message.usage_metadata,
        response_metadata=message.response_metadata,
        chunk_position="last",
    )


class TextGrowth:
    """A reply's text as its tokens come: each new token gives the text that may be shown
    so far, never into a stop string or a half-decoded character (None: nothing new)."""

    def __init__(self, tokenizer: Any, stop: Sequence[str]) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.tokens: list[int] = []
        self.hold = max((len(s) for s in stop), default=1) - 1

    def add(self, token: int) -> str | None:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return None
        cuts = [text.find(s) for s in self.stop if s in text]
        return text[: min(cuts)] if cuts else text[: len(text) - self.hold]


class TokenStream:
    """Runs one ``Engine.chat`` on a worker thread and hands its tokens over as they come."""

    _DONE = object()

    def __init__(self, engine: Any, args: dict[str, Any]) -> None:
        self.engine = engine
        self.stop: Sequence[str] = args["stop"] or ()
        self._queue: queue.Queue[Any] = queue.Queue()
        self._outcome: KVResult | BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(args,), daemon=True)
        self._thread.start()

    def _run(self, args: dict[str, Any]) -> None:
        try:
            self._outcome = self.engine.chat(**args, on_token=self._queue.put)
        except BaseException as exc:  # handed to the consumer, re-raised there
            self._outcome = exc
        self._queue.put(self._DONE)

    def texts(self) -> Iterator[str]:
        """The decoded reply so far, each time it can safely grow (:class:`TextGrowth`)."""
        growth = TextGrowth(self.engine.tokenizer, self.stop)
        while (item := self._queue.get()) is not self._DONE:
            if (text := growth.add(item)) is not None:
                yield text

    def result(self) -> KVResult:
        self._thread.join()
        if isinstance(self._outcome, BaseException):
            raise self._outcome
        assert self._outcome is not None
        return self._outcome


async def astream_texts(
    engine: Any, args: dict[str, Any], out: list[KVResult]
) -> AsyncIterator[str]:
    """``Engine.achat``'s reply as it grows (:class:`TextGrowth`), on the event loop, no
    thread per call; the call's result is appended to ``out`` at the end."""
    tokens: asyncio.Queue[Any] = asyncio.Queue()
    call = asyncio.ensure_future(engine.achat(**args, on_token=tokens.put_nowait))
    call.add_done_callback(lambda _: tokens.put_nowait(TokenStream._DONE))
    growth = TextGrowth(engine.tokenizer, args["stop"] or ())
    try:
        while (item := await tokens.get()) is not TokenStream._DONE:
            if (text := growth.add(item)) is not None:
                yield text
        out.append(await call)
    finally:
        call.cancel()  # a consumer that stops early cancels the call (no-op once done)


def reply_message(result: KVResult, engine: Any, tools: bool) -> AIMessage:
    """The LangChain reply of a whole call (tool calls parsed when tools are bound)."""
    text, calls, bad = parse_calls(result.text) if tools else (result.text, [], [])
    return AIMessage(
        content=text,
        tool_calls=calls,
        invalid_tool_calls=bad,
        usage_metadata=usage(result),
        response_metadata=response_metadata(result, engine),
    )


def last_chunk(result: KVResult, sent: str, engine: Any) -> AIMessageChunk:
    """The stream's last chunk: the text not sent yet, usage and kvshare's figures."""
    rest = result.text[len(sent) :] if result.text.startswith(sent) else ""
    return AIMessageChunk(
        content=rest,
        usage_metadata=usage(result),
        response_metadata=response_metadata(result, engine),
        chunk_position="last",
    )


def usage(result: KVResult) -> UsageMetadata:
    """LangChain usage metadata; ``cache_read``: prompt tokens whose KV was reused."""
    s = result.stats
    return UsageMetadata(
        input_tokens=s.prompt_tokens,
        output_tokens=s.output_tokens,
        total_tokens=s.prompt_tokens + s.output_tokens,
        input_token_details={"cache_read": s.prompt_tokens - s.computed_tokens},
    )


def response_metadata(result: KVResult, engine: Any) -> dict[str, Any]:
    """kvshare's figures of the call (``CallStats``) beside the model name."""
    stats = result.stats.as_dict()
    stats.pop("stages", None)
    return {"model_name": engine.loaded.source, **stats, "reuse_rate": result.stats.reuse_rate}
