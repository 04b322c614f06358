"""kvshare: KV-cache reuse across agents of a multi-agent LLM workflow.

The public API is ``kvshare.__all__``, and only that: the engine and its config, the result and
stats of a call, the LangChain / LangGraph integration, the agent API and every error kvshare
raises. Everything else is reachable by its module path, without a promise.

Wing: the top (``api``); may import every wing. The core beneath every wing is ``errors``,
``scope``, ``validate``, ``registry`` and ``files`` (they import nothing of kvshare but each
other); ``config`` sits between ``store`` and ``sched``. The engine's names are imported at
once; ``ChatKVShare``, ``wrap``, ``Agent`` and ``Session`` on first use, so ``import kvshare``
does not import LangChain.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from kvshare.config import EngineConfig
from kvshare.engine.engine import ChatResult, Engine
from kvshare.engine.stats import CallStats, SessionStats
from kvshare.errors import (
    CacheDirError,
    ConfigError,
    ContextLengthError,
    DecodeCapacityError,
    KernelUnavailableError,
    KVShareError,
    ModelMismatchError,
    ModelNotFoundError,
    NonFiniteError,
    PromptError,
    SandboxUnavailableError,
    ScopeError,
    StateFileError,
    StructuredOutputError,
    UnsupportedModelError,
)
from kvshare.sched.hints import Hint

if TYPE_CHECKING:
    from kvshare.agents.session import Agent, Session
    from kvshare.integrations.langchain import ChatKVShare
    from kvshare.integrations.langgraph import wrap

_LAZY = {
    "Agent": "kvshare.agents.session",
    "Session": "kvshare.agents.session",
    "ChatKVShare": "kvshare.integrations.langchain",
    "wrap": "kvshare.integrations.langgraph",
}

__all__ = [
    # the engine
    "Engine",
    "EngineConfig",
    "ChatResult",
    "CallStats",
    "SessionStats",
    "Hint",
    # workflows
    "ChatKVShare",
    "wrap",
    "Agent",
    "Session",
    # errors
    "KVShareError",
    "CacheDirError",
    "ConfigError",
    "ContextLengthError",
    "DecodeCapacityError",
    "KernelUnavailableError",
    "ModelMismatchError",
    "ModelNotFoundError",
    "NonFiniteError",
    "PromptError",
    "SandboxUnavailableError",
    "ScopeError",
    "StateFileError",
    "StructuredOutputError",
    "UnsupportedModelError",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """The workflow names, imported on first use (PEP 562)."""
    if name not in _LAZY:
        raise AttributeError(f"module 'kvshare' has no attribute {name!r}")
    value = getattr(import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
