"""kvshare: KV-cache reuse across agents of a multi-agent LLM workflow."""

from kvshare.config import EngineConfig
from kvshare.engine import ChatResult, Engine
from kvshare.errors import KVShareError
from kvshare.stats import CallStats, SessionStats

__all__ = ["CallStats", "ChatResult", "Engine", "EngineConfig", "KVShareError", "SessionStats"]
__version__ = "0.1.0"
