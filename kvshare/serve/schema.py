"""Request bodies (pydantic): the part of OpenAI's chat-completions API that kvshare serves.

Unknown fields are refused (400 naming the field) rather than silently ignored; fields
OpenAI has but kvshare cannot honour (``n > 1``, ``logprobs``, penalties, a
``response_format`` other than text, forcing a tool) are refused by :func:`check_supported`.
Nothing here can name a tenant: it comes from the API key alone (``kvshare.serve.auth``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kvshare.errors import ConfigError

_STRICT = ConfigDict(extra="forbid")


class UnsupportedError(ConfigError):
    """A field OpenAI's API has but kvshare does not implement (400 naming ``param``)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    model_config = _STRICT
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    model_config = _STRICT
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    """One chat message; ``developer`` is treated as ``system``."""

    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class FunctionDef(BaseModel):
    model_config = _STRICT
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = _STRICT
    type: Literal["function"]
    function: FunctionDef


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class ChatRequest(BaseModel):
    """``POST /v1/chat/completions``'s body."""

    model_config = _STRICT
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=(1 << 63) - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    tools: list[Tool] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    n: int = 1
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, float] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None
    prompt_cache_key: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None


class HintRequest(BaseModel):
    """``POST /v1/kvshare/hints``: which agent of ``session`` runs now and which run next."""

    model_config = _STRICT
    session: str = Field(min_length=1)
    running: str | None = None
    next: list[str] = Field(default_factory=list)
    release: list[str] = Field(default_factory=list)
    ttl: float | None = None


def check_supported(req: ChatRequest) -> None:
    """UnsupportedError (naming the field) for what kvshare cannot honour."""
    refuse = [
        ("n", req.n != 1, "n must be 1: one choice per request"),
        ("logprobs", bool(req.logprobs), "logprobs are not supported"),
        ("top_logprobs", req.top_logprobs is not None, "top_logprobs are not supported"),
        ("logit_bias", bool(req.logit_bias), "logit_bias is not supported"),
        ("presence_penalty", bool(req.presence_penalty), "presence_penalty must be 0"),
        ("frequency_penalty", bool(req.frequency_penalty), "frequency_penalty must be 0"),
        ("store", bool(req.store), "store=true is not supported (nothing is stored for later)"),
    ]
    for param, bad, message in refuse:
        if bad:
            raise UnsupportedError(param, message)
    fmt = (req.response_format or {}).get("type", "text")
    if fmt != "text":
        raise UnsupportedError(
            "response_format",
            f"response_format {fmt!r} needs constrained decoding, which kvshare does not have "
            f"yet; only 'text' is supported",
        )
    if req.max_tokens is not None and req.max_completion_tokens is not None:
        raise UnsupportedError("max_tokens", "give max_tokens or max_completion_tokens, not both")
    if req.stream_options is not None and not req.stream:
        raise UnsupportedError("stream_options", "stream_options needs stream=true")
    if isinstance(req.stop, list) and len(req.stop) > 4:
        raise UnsupportedError("stop", "at most 4 stop strings")
    if req.tool_choice not in (None, "auto", "none"):
        raise UnsupportedError(
            "tool_choice",
            "tool_choice other than 'auto' or 'none' needs constrained decoding, which kvshare "
            "does not have yet",
        )
