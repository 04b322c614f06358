"""The server's configuration: limits, auth and drain settings, read from ``--config FILE``.

A config file is TOML (``.toml``) or JSON (anything else) with up to two tables: ``serve``
(the fields of :class:`ServeConfig`) and ``engine`` (flat ``EngineConfig`` options, e.g.
``mode``, ``max_decode_batch``). Unknown names and bad values raise ConfigError before a
server starts. The server's engine defaults differ from the library's in
:data:`SERVER_ENGINE_DEFAULTS`: ``special_token_roles=()``, so no client message (a system
message included: clients write those too) can carry control tokens such as
``<|im_start|>``; a config file may name the option to trust some role again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import tomllib

from kvshare.config import EngineConfig
from kvshare.errors import ConfigError
from kvshare.validate import check_float, check_int

LOOPBACK = ("127.0.0.1", "::1", "localhost")
SERVER_ENGINE_DEFAULTS: dict[str, Any] = {"special_token_roles": ()}


@dataclass(frozen=True)
class ServeConfig:
    """What one ``kvshare serve`` process allows.

    keys_file: the API keys (``kvshare.serve.auth``); None: no auth, every request is tenant
    ``local_tenant`` (allowed on a loopback host only, checked by the CLI). max_concurrent and
    max_queued_prompt_tokens: per tenant, requests in flight and their prompt tokens summed
    (over either: 429 with ``Retry-After: retry_after_s``). max_body_bytes: a larger body is
    413. max_tokens_cap: the most ``max_tokens`` a request may ask for (None: the engine's
    ``max_new_tokens_cap``); default_max_tokens when a request names none. drain_s: after
    SIGTERM, how long in-flight requests get to finish. model_id: the name in ``/v1/models``
    and replies (None: the engine's model source's last path part). keys_check_s: how often at
    most the keys file is checked for a change (``kvshare.serve.auth``).
    """

    keys_file: str | None = None
    local_tenant: str = "local"
    max_concurrent: int = 16
    max_queued_prompt_tokens: int = 65536
    max_body_bytes: int = 4 << 20
    max_tokens_cap: int | None = None
    default_max_tokens: int = 256
    retry_after_s: int = 1
    drain_s: float = 30.0
    model_id: str | None = None
    keys_check_s: float = 1.0

    def __post_init__(self) -> None:
        check_int("max_concurrent", self.max_concurrent, 1, 1 << 20)
        check_int("max_queued_prompt_tokens", self.max_queued_prompt_tokens, 1, 1 << 40)
        check_int("max_body_bytes", self.max_body_bytes, 256, 1 << 34)
        check_int("default_max_tokens", self.default_max_tokens, 1, 1 << 24)
        check_int("retry_after_s", self.retry_after_s, 1, 3600)
        check_float("drain_s", self.drain_s, 0.0, 3600.0)
        check_float("keys_check_s", self.keys_check_s, 0.0, 3600.0)
        if self.max_tokens_cap is not None:
            check_int("max_tokens_cap", self.max_tokens_cap, 1, 1 << 24)
        if not isinstance(self.local_tenant, str) or not self.local_tenant:
            raise ConfigError(f"local_tenant must be a non-empty str, got {self.local_tenant!r}")


def read_config(path: str | Path) -> tuple[ServeConfig, EngineConfig]:
    """(ServeConfig, EngineConfig) of a config file (module docstring); ConfigError for a
    missing or unparsable file, an unknown table or name, or a bad value."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
        data = tomllib.loads(text) if p.suffix == ".toml" else json.loads(text)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read config file {str(p)!r}: {exc}") from exc
    if not isinstance(data, dict) or set(data) - {"serve", "engine"}:
        raise ConfigError(f"{str(p)!r}: the config holds only the tables 'serve' and 'engine'")
    serve, engine = data.get("serve", {}), data.get("engine", {})
    if not isinstance(serve, dict) or not isinstance(engine, dict):
        raise ConfigError(f"{str(p)!r}: 'serve' and 'engine' must be tables")
    return serve_config(**serve), server_engine_config(**engine)


def server_engine_config(**options: Any) -> EngineConfig:
    """The engine config of a server: ``options`` over :data:`SERVER_ENGINE_DEFAULTS`."""
    return EngineConfig.of(**{**SERVER_ENGINE_DEFAULTS, **options})


def serve_config(base: ServeConfig | None = None, **options: Any) -> ServeConfig:
    """``base`` (default: the defaults) with ``options``; ConfigError for an unknown name."""
    unknown = set(options) - {f.name for f in fields(ServeConfig)}
    if unknown:
        raise ConfigError(f"unknown serve option(s): {', '.join(sorted(unknown))}")
    try:
        return replace(base or ServeConfig(), **options)
    except TypeError as exc:
        raise ConfigError(f"bad serve option: {exc}") from exc
