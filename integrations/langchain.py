"""``ChatKVShare``: a LangChain chat model whose calls go through a kvshare :class:`Engine`.

Inside a LangGraph graph nothing needs configuring: the agent is the node running the call
(``langgraph_node``; an ``lc_agent_name`` or an explicit ``agent=`` wins) and the session is
the graph's ``thread_id``, read from the current runnable config. ``usage_metadata`` reports
the reused prompt tokens as ``input_token_details.cache_read`` (what LangSmith shows for
prompt caching); kvshare's own figures are in ``response_metadata``. ``bind_tools`` works for
any model (``kvshare.integrations.tools``: a byte-stable tool block first in the prompt, calls
parsed from the reply); ``with_structured_output`` goes through that tool path, validating the
reply and retrying. Forcing a call (``tool_choice`` other than ``auto``/``none``), JSON mode,
``json_schema`` and ``strict`` structured output need constrained decoding, which kvshare does
not have yet (issue 11): they raise ConfigError. One ChatKVShare runs its engine's one model: a
per-call ``model=`` naming another model is a ConfigError, never silently ignored.
Replies are built in ``kvshare.integrations.replies``, structured output's checks and retries
live in ``kvshare.integrations.structured``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from functools import partial
from typing import Any

from kvshare.integrations.langgraph import successors, workflow_of
from kvshare.integrations.replies import (
    TokenStream,
    as_chunk,
    astream_texts,
    last_chunk,
    reply_message,
)
from kvshare.integrations.structured import (
    check_structured_options,
    parse_structured,
    structured_attempts,
)
from kvshare.integrations.tools import tool_schemas, with_tools
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableLambda
from langchain_core.runnables.config import ensure_config
from pydantic import ConfigDict, Field, model_validator

from kvshare.engine.engine import Engine
from kvshare.engine.results import ChatResult as KVResult
from kvshare.errors import ConfigError


class ChatKVShare(BaseChatModel):
    """A chat model over ``engine`` (None: the embedded default model in ``kvshare`` mode).

    Parameters are the defaults of every call: agent, session, tenant (ids: ``str``),
    max_tokens, temperature, top_p, stop, seed, shadow (measure fidelity against a full
    prefill, changing nothing), teach (let a full prefill teach the anchor pool and the
    recompute ratio). Errors are kvshare's named exceptions (``kvshare.errors``).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    engine: Any = Field(default=None, exclude=True)
    agent: str | None = None
    session: str | None = None
    tenant: str | None = None
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] | None = None
    seed: int | None = None
    shadow: bool = False
    teach: bool = False

    @model_validator(mode="after")
    def _load(self) -> ChatKVShare:
        if self.engine is None:
            self.engine = Engine.from_pretrained()
        return self

    @property
    def _llm_type(self) -> str:
        return "kvshare"

    @property
    def model_name(self) -> str:
        """The engine's model, as its source (a local path, ``random:NAME``, or the embedded
        model's converted directory): ``model_name`` in replies, ``ls_model_name`` in traces."""
        return str(self.engine.loaded.source)

    @property
    def _identifying_params(self) -> dict[str, Any]:
        """What decides a reply (LangChain's LLM-cache key and ``dict()``): the model, the
        engine mode and every sampling default."""
        return {
            "model": self.model_name,
            "mode": self.engine.config.mode,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "stop": self.stop,
            "seed": self.seed,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        """LangSmith's standard parameters of a call: per-call values over the defaults."""
        model = kwargs.get("model")
        params = LangSmithParams(
            ls_provider="kvshare",
            ls_model_name=model if isinstance(model, str) else self.model_name,
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
            ls_max_tokens=kwargs.get("max_tokens", self.max_tokens),
        )
        stops = stop if stop is not None else self.stop
        if stops:
            params["ls_stop"] = list(stops)
        return params

    def get_token_ids(self, text: str) -> list[int]:
        """``text``'s ids in the engine's tokenizer (LangChain's default would fetch GPT-2's)."""
        if self.custom_get_token_ids is not None:
            return self.custom_get_token_ids(text)
        return list(self.engine.tokenizer.encode(text, add_special_tokens=False))

    def bind_tools(
        self,
        tools: Sequence[Any],
        *,
        tool_choice: str | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind ``tools`` (functions, pydantic models, ``@tool``s or OpenAI dicts). Only
        ``tool_choice`` None/``auto`` (the model decides) and ``none`` are supported: forcing a
        call needs constrained decoding, which kvshare does not have yet (ConfigError)."""
        if tool_choice not in (None, "auto", "none"):
            raise ConfigError(
                f"tool_choice={tool_choice!r} needs constrained decoding, which kvshare does "
                f"not support yet; use tool_choice='auto' (the model decides) or 'none'"
            )
        schemas = [] if tool_choice == "none" else tool_schemas(tools)
        return self.bind(tools=schemas, **kwargs)

    def with_structured_output(
        self,
        schema: Any,
        *,
        include_raw: bool = False,
        retries: int = 2,
        method: str | None = "function_calling",
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, Any]:
        """Replies as ``schema`` (a pydantic model, a TypedDict or a JSON-schema dict) through
        the tool path: the model is asked to call a tool of that schema; its arguments are
        validated (a pydantic object, else the dict). A reply that does not fit is retried up
        to ``retries`` times, sampling at temperature 0.7 with seeds 0, 1, ...; then
        StructuredOutputError. ``include_raw``: ``{"raw", "parsed", "parsing_error"}``.
        ``method``: ``function_calling`` only; ``json_schema``, ``json_mode`` and
        ``strict=True`` need constrained decoding (ConfigError)."""
        check_structured_options(method, strict, kwargs)
        name = tool_schemas([schema])[0]["function"]["name"]
        llm = self.bind_tools(
            [schema],
            ls_structured_output_format={
                "kwargs": {"method": "function_calling"},
                "schema": schema,
            },
        )
        parse = partial(parse_structured, schema, name)
        attempts = partial(
            structured_attempts, llm, parse, name=name, retries=retries, raw=include_raw
        )
        return RunnableLambda(attempts, name=f"structured_output[{name}]")

    def _start_call(
        self, messages: list[BaseMessage], stop: list[str] | None, **kwargs: Any
    ) -> dict[str, Any]:
        """Engine.chat arguments (the model's defaults, per-call overrides, the agent and
        session of the LangGraph task this call runs in), after hinting the engine where a
        wrapped workflow stands (:meth:`_hint`): every call starts here, once."""
        model = kwargs.get("model")
        if model is not None and model != self.model_name:
            raise ConfigError(
                f"model={model!r}: this ChatKVShare runs its engine's model {self.model_name!r}"
                f" only; make a ChatKVShare over an Engine of that model instead"
            )
        config = ensure_config()
        meta, conf = config.get("metadata") or {}, config.get("configurable") or {}
        tools = kwargs.get("tools")
        agent = self.agent or meta.get("lc_agent_name") or meta.get("langgraph_node")
        session = self.session or conf.get("thread_id") or meta.get("thread_id")
        self._hint(meta.get("langgraph_node"), session)
        return {
            "messages": with_tools(messages, tools or ()),  # tool history as text, always
            "agent": agent,
            "session": session,
            "tenant": self.tenant,
            "max_new_tokens": kwargs.get("max_tokens", self.max_tokens),
            "temperature": kwargs.get("temperature", self.temperature),
            "top_p": kwargs.get("top_p", self.top_p),
            "stop": stop if stop is not None else self.stop,
            "seed": kwargs.get("seed", self.seed),
            "shadow": kwargs.get("shadow", self.shadow),
            "teach": kwargs.get("teach", self.teach),
        }

    def _hint(self, node: Any, session: Any) -> None:
        """Inside a wrapped workflow run (``kvshare.integrations.langgraph.wrap``): this node
        runs now, its successors in the step graph next."""
        if not isinstance(node, str) or not isinstance(session, str):
            return
        nexts = successors(self.engine, node)
        if nexts is not None:
            graph = workflow_of(self.engine, node)
            if graph is not None and not self.engine.knows_workflow(session, graph):
                self.engine.register_workflow(session, graph)  # steps-to-execution
            self.engine.hint(session, running=node, next=nexts, tenant=self.tenant)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        result = self.engine.chat(**self._start_call(messages, stop, **kwargs))
        message = reply_message(result, self.engine, bool(kwargs.get("tools")))
        return ChatResult(generations=[ChatGeneration(message=message)])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        """``Engine.achat``: the call joins the engine's batch; no executor thread."""
        result = await self.engine.achat(**self._start_call(messages, stop, **kwargs))
        message = reply_message(result, self.engine, bool(kwargs.get("tools")))
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        """Text as it is generated; the last chunk carries usage and kvshare's figures.
        Text that could still become a stop string is held back until it cannot. With tools
        bound, the reply comes as one chunk once its calls are parsed."""
        if kwargs.get("tools"):
            whole = self._generate(messages, stop, run_manager, **kwargs).generations[0].message
            assert isinstance(whole, AIMessage)
            yield ChatGenerationChunk(message=as_chunk(whole))
            return
        stream = TokenStream(self.engine, self._start_call(messages, stop, **kwargs))
        sent = ""
        for text in stream.texts():
            if len(text) > len(sent):
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=text[len(sent) :]))
                if run_manager is not None:
                    run_manager.on_llm_new_token(text[len(sent) :], chunk=chunk)
                sent = text
                yield chunk
        yield ChatGenerationChunk(message=last_chunk(stream.result(), sent, self.engine))

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        """:meth:`_stream` on the event loop (``Engine.achat``; no executor thread)."""
        if kwargs.get("tools"):
            whole = await self._agenerate(messages, stop, run_manager, **kwargs)
            message = whole.generations[0].message
            assert isinstance(message, AIMessage)
            yield ChatGenerationChunk(message=as_chunk(message))
            return
        done: list[KVResult] = []
        sent = ""
        async for text in astream_texts(
            self.engine, self._start_call(messages, stop, **kwargs), done
        ):
            if len(text) > len(sent):
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=text[len(sent) :]))
                if run_manager is not None:
                    await run_manager.on_llm_new_token(text[len(sent) :], chunk=chunk)
                sent = text
                yield chunk
        yield ChatGenerationChunk(message=last_chunk(done[0], sent, self.engine))
