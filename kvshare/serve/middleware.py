"""ASGI pieces under every route: the body size cap and the request counter by status."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from kvshare.serve.errors import body
from kvshare.serve.metrics import Metrics

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class BodyTooLarge(Exception):
    """Raised into the app when a chunked body grows past the cap (already answered 413)."""


class Guard:
    """Under every route: 413 for a request body over ``max_bytes`` (at once when
    ``Content-Length`` says so, else as soon as the received chunks pass it: the app never
    sees a whole body and what it answers then is dropped), and the answer counted by route
    and status (``kvshare_requests_total``)."""

    def __init__(self, app: Any, max_bytes: int, metrics: Metrics) -> None:
        self.app, self.max_bytes, self.metrics = app, max_bytes, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 0, "refused": False}
        length = dict(scope.get("headers", ())).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await self._refuse(send, status)
            self._count(scope, 413)
            return
        seen = 0

        async def counted() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes and not status["refused"]:
                if not status["code"]:
                    await self._refuse(send, status)
                raise BodyTooLarge
            return message

        async def tracked(message: dict[str, Any]) -> None:
            if status["refused"]:
                return
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except BodyTooLarge:
            pass
        finally:
            self._count(scope, 413 if status["refused"] else status["code"] or 500)

    def _count(self, scope: Scope, code: int) -> None:
        path = getattr(scope.get("route"), "path", "unmatched")
        self.metrics.requests.labels(path, str(code)).inc()

    async def _refuse(self, send: Send, status: dict[str, Any]) -> None:
        status["refused"] = True
        data = json.dumps(
            body(413, f"request body over {self.max_bytes} bytes", None, "body_too_large")
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": data})
