"""``ChatKVShare.with_structured_output``'s pieces: the option checks, the retry loop and the
validation of a reply's tool call against the schema (kvshare has no constrained decoding)."""

from __future__ import annotations

from typing import Any

from langchain_core.language_models import LanguageModelInput
from langchain_core.runnables import Runnable
from langchain_core.utils.pydantic import is_basemodel_subclass

from kvshare.errors import ConfigError, StructuredOutputError

_STRUCTURED_METHODS = (None, "function_calling")


def check_structured_options(method: str | None, strict: bool | None, extra: dict) -> None:
    """ConfigError for structured-output options kvshare cannot honour."""
    if extra:
        raise ConfigError(f"unsupported with_structured_output options: {sorted(extra)}")
    if method not in _STRUCTURED_METHODS:
        raise ConfigError(
            f"with_structured_output(method={method!r}) needs constrained decoding, which "
            f"kvshare does not support yet; use method='function_calling' (validated, retried)"
        )
    if strict:
        raise ConfigError(
            "with_structured_output(strict=True) needs constrained decoding, which kvshare does "
            "not support yet; replies are validated against the schema and retried instead"
        )


def structured_attempts(
    llm: Runnable[LanguageModelInput, Any],
    parse: Any,
    prompt: LanguageModelInput,
    *,
    name: str,
    retries: int,
    raw: bool,
) -> Any:
    """Call ``llm`` on ``prompt`` until ``parse`` accepts a reply: greedy first, then up to
    ``retries`` samples at temperature 0.7 (seeds 0, 1, ...); StructuredOutputError after."""
    errors: list[str] = []
    for attempt in range(retries + 1):
        opts: dict[str, Any] = {"temperature": 0.7, "seed": attempt - 1} if attempt else {}
        reply = llm.invoke(prompt, None, **opts)
        try:
            parsed = parse(reply)
        except ValueError as exc:
            errors.append(str(exc))
            continue
        return {"raw": reply, "parsed": parsed, "parsing_error": None} if raw else parsed
    raise StructuredOutputError(
        f"no reply fit the schema {name!r} in {retries + 1} attempts: {errors[-1]}"
    )


def parse_structured(schema: Any, name: str, message: Any) -> Any:
    """The arguments of ``message``'s call of tool ``name`` as ``schema`` (ValueError if the
    reply has no such call or its arguments do not validate). Pydantic v2 and v1 models give
    their object, other schemas the arguments dict."""
    calls = [c for c in getattr(message, "tool_calls", []) if c["name"] == name]
    if not calls:
        raise ValueError(f"the reply calls no tool {name!r}: {str(message.content)[:80]!r}")
    args = calls[0]["args"]
    if not is_basemodel_subclass(schema):
        return args
    validate = getattr(schema, "model_validate", None) or schema.parse_obj  # v2, else v1
    try:
        return validate(args)
    except ValueError as exc:  # pydantic v1 and v2 ValidationErrors are ValueErrors
        raise ValueError(str(exc)) from None
