"""Engine results as LangChain replies: usage and response metadata, a whole reply as one
stream chunk, and ``TokenStream`` (one ``Engine.chat`` on a worker thread, its text as it
grows) for ``ChatKVShare._stream``."""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Any

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
        """The decoded reply so far, each time it can safely grow: never into a stop string
        or a half-decoded character."""
        tokens: list[int] = []
        hold = max((len(s) for s in self.stop), default=1) - 1
        while (item := self._queue.get()) is not self._DONE:
            tokens.append(item)
            text = self.engine.tokenizer.decode(tokens, skip_special_tokens=True)
            if text.endswith("\ufffd"):
                continue
            cuts = [text.find(s) for s in self.stop if s in text]
            yield text[: min(cuts)] if cuts else text[: len(text) - hold]

    def result(self) -> KVResult:
        self._thread.join()
        if isinstance(self._outcome, BaseException):
            raise self._outcome
        assert self._outcome is not None
        return self._outcome


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
