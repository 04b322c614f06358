"""One HTTP request through an ASGI app in this process, its answer as plain messages.

A replica of ``kvshare serve --replicas`` runs the single server's whole app
(``kvshare.serve.app``: keys, limits, metrics, errors) and gets requests from the Ray
ingress as a picklable :class:`HttpCall`; :func:`call_app` drives the app with it and yields
the answer as it comes: first ``{"status", "headers"}``, then ``{"body": bytes}`` chunks (a
stream's events one by one). No Ray here: the ingress and the replica (``kvshare.serve.
ray_app``) carry these across.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

# Hop-by-hop or length headers a proxy must not copy onto a re-framed answer.
DROPPED = frozenset({b"content-length", b"transfer-encoding", b"connection", b"keep-alive"})


@dataclass(frozen=True)
class HttpCall:
    """A request as it reached the ingress. headers: (lower-case name, value) byte pairs."""

    method: str
    path: str
    query: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (lower case), decoded as latin-1."""
        key = name.encode()
        return next((v.decode("latin-1") for k, v in self.headers if k == key), None)


def scope_of(call: HttpCall) -> dict[str, Any]:
    """The ASGI HTTP scope of ``call`` (client and server: loopback placeholders)."""
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
        "method": call.method, "scheme": "http", "path": call.path, "raw_path": call.path.encode(),
        "query_string": call.query, "root_path": "", "headers": list(call.headers),
        "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 80),
    }  # fmt: skip


async def call_app(app: Any, call: HttpCall, extra: dict[bytes, bytes]) -> AsyncIterator[dict]:
    """Run ``call`` through ``app``; yields ``{"status", "headers"}`` once, then
    ``{"body"}`` chunks as the app sends them. ``extra``: headers added to the answer.
    Closing the iterator early cancels the app (a client that went away)."""
    out: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": call.body, "more_body": False}
        await asyncio.Event().wait()  # the body is whole: nothing more until cancelled
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await out.put(message)

    async def run() -> None:
        try:
            await app(scope_of(call), receive, send)
        finally:
            await out.put(None)

    task = asyncio.create_task(run())
    try:
        while (message := await out.get()) is not None:
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", []) if k not in DROPPED]
                yield {"status": message["status"], "headers": kept + list(extra.items())}
            elif message["type"] == "http.response.body" and message.get("body"):
                yield {"body": bytes(message["body"])}
        await task  # the app's own exception, if any
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
