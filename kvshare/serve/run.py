"""Running the app under uvicorn, with a drain on SIGTERM/SIGINT.

On the first signal the app stops being ready (``/ready`` answers 503, new chat requests
503), uvicorn stops accepting connections and waits up to ``ServeConfig.drain_s`` seconds
for the requests in flight (streams included) to finish; then the engine's trace store moves
what it holds in memory to its disk tier, if it has one (``SegmentStore.persist``: a server
started later over the same ``disk_tier_dir`` adopts it), and the process exits 0.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import socket
from typing import Any

import uvicorn

from kvshare.errors import ConfigError
from kvshare.serve.app import create_app
from kvshare.serve.config import LOOPBACK, ServeConfig


class UnsafeBindError(ConfigError):
    """``--no-auth`` on a host that is not a loopback address."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) means this machine only."""
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, config: ServeConfig) -> None:
    """UnsafeBindError unless keys are configured or ``host`` is loopback."""
    if config.keys_file is None and not is_loopback(host):
        raise UnsafeBindError(
            f"--no-auth serves everyone as one tenant: it is allowed only on a loopback host "
            f"(127.0.0.1, ::1, localhost), not {host!r}; give --keys FILE instead"
        )


log = logging.getLogger("kvshare.serve")


class DrainingServer(uvicorn.Server):
    """uvicorn's server that marks the app as draining when asked to exit, persists the
    trace store after its requests ended, and exits 0 after a drain (uvicorn would raise
    the signal again once shut down; a second SIGINT still forces the exit)."""

    def __init__(self, config: uvicorn.Config, state: Any) -> None:
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.state.draining = True
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True

    async def shutdown(self, sockets: Any = None) -> None:
        await super().shutdown(sockets)
        try:
            moved = await asyncio.to_thread(self.state.engine.segments.persist)
        except Exception:  # the drain still ends: what is not persisted is recomputed later
            log.exception("kvshare serve: persisting the trace store failed")
            return
        if moved:
            log.info("kvshare serve: %d stored segments moved to the disk tier", moved)


def make_server(
    engine: Any, config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, **uv: Any
) -> DrainingServer:
    """A server for ``engine`` bound to ``host:port`` (not started). ``uv``: more
    ``uvicorn.Config`` options (e.g. ``log_level``)."""
    check_bind(host, config)
    app = create_app(engine, config)
    uv.setdefault("log_level", "warning")
    cfg = uvicorn.Config(
        app, host=host, port=port, timeout_graceful_shutdown=int(config.drain_s) or None,
        lifespan="off", **uv,
    )  # fmt: skip
    return DrainingServer(cfg, app.state.serve)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (for tests and benches)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
