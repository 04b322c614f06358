"""The FastAPI app of ``kvshare serve``: :func:`create_app` over one Engine.

Routes: ``POST /v1/chat/completions`` (``kvshare.serve.chat``), ``GET /v1/models``,
``POST /v1/kvshare/hints`` (API key needed); ``GET /health`` (the process answers),
``GET /ready`` (model loaded and not draining: 503 while draining), ``GET /metrics``
(Prometheus text). ``app.state.serve`` holds the :class:`ServeState`.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from kvshare.serve import chat, errors
from kvshare.serve.auth import KeyChecker
from kvshare.serve.config import ServeConfig
from kvshare.serve.errors import ServeError
from kvshare.serve.limits import TenantLimits
from kvshare.serve.metrics import Metrics
from kvshare.serve.middleware import Guard
from kvshare.serve.schema import ChatRequest, HintRequest


@dataclass
class ServeState:
    """What every request of one app shares. draining: set on SIGTERM (``kvshare.serve.run``)."""

    engine: Any
    config: ServeConfig
    model_id: str
    max_tokens_cap: int
    keys: KeyChecker | None
    limits: TenantLimits
    metrics: Metrics = field(default_factory=Metrics)
    draining: bool = False


def make_state(engine: Any, config: ServeConfig) -> ServeState:
    """The state of an app over ``engine``; ConfigError for a corrupt keys file."""
    cap = min(config.max_tokens_cap or 1 << 30, engine.config.max_new_tokens_cap)
    model_id = config.model_id or Path(str(engine.loaded.source)).name
    keys = KeyChecker.of_file(config.keys_file, config.keys_check_s) if config.keys_file else None
    limits = TenantLimits(
        config.max_concurrent, config.max_queued_prompt_tokens, config.retry_after_s
    )
    return ServeState(engine, config, model_id, cap, keys, limits)


def create_app(engine: Any, config: ServeConfig | None = None) -> FastAPI:
    """An app serving ``engine`` under ``config`` (default: no keys file, i.e. one tenant)."""
    state = make_state(engine, config or ServeConfig())
    app = FastAPI(title="kvshare", docs_url=None, redoc_url=None)
    app.state.serve = state
    errors.install(app)
    app.add_middleware(Guard, max_bytes=state.config.max_body_bytes, metrics=state.metrics)

    async def tenant_of(request: Request) -> str:
        """The caller's tenant: a key seen before costs one HMAC on the loop; a new one its
        scrypt, in a worker thread (the loop keeps serving)."""
        keys = state.keys
        if keys is None:
            return state.config.local_tenant
        header = request.headers.get("authorization")
        known = keys.known(header)
        return known if known is not None else await asyncio.to_thread(keys.tenant, header)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if state.draining:
            return JSONResponse({"status": "draining"}, 503)
        return JSONResponse({"status": "ready", "model": state.model_id})

    @app.get("/metrics")
    async def metrics() -> Response:
        limits = state.limits
        text = state.metrics.render(state.engine, limits.in_flight(), limits.waiting)
        return Response(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(_: str = Depends(tenant_of)) -> dict[str, Any]:
        entry = {"id": state.model_id, "object": "model", "created": 0, "owned_by": "kvshare"}
        return {"object": "list", "data": [entry]}

    @app.post("/v1/kvshare/hints")
    async def hints(body: HintRequest, tenant: str = Depends(tenant_of)) -> dict[str, Any]:
        h = state.engine.hint(
            body.session, running=body.running, next=body.next, release=body.release,
            ttl=body.ttl, tenant=tenant,
        )  # fmt: skip
        return {"object": "kvshare.hint", "session": h.session, "next": list(h.next)}

    @app.post("/v1/chat/completions", response_model=None)
    async def completions(
        body: ChatRequest, request: Request, tenant: str = Depends(tenant_of)
    ) -> Any:
        try:
            return await complete(state, body, request, tenant)
        except Exception as exc:  # answered here: the connection stays usable
            return errors.response(exc)

    return app


async def complete(state: ServeState, req: ChatRequest, request: Request, tenant: str) -> Any:
    """One chat request (``kvshare.serve.chat``'s order of checks)."""
    if state.draining:
        raise ServeError(503, "the server is shutting down; retry on another", None, "draining")
    who = chat.caller(tenant, req, request.headers)
    args = chat.call_args(state, req, who)
    hint = chat.next_hint(state, req, who)
    slot = state.limits.acquire(tenant, chat.prompt_estimate(req))
    slot.on_start = hint
    if not req.stream:
        reply = await chat.whole(state, req, args, slot)
        return Response(json.dumps(reply, separators=(",", ":")), media_type="application/json")
    events = chat.streamed(state, req, args, slot)
    first = await anext(events)  # errors before the first text: a plain error answer

    async def replay() -> Any:
        async with aclosing(events):  # a disconnect closes the call's stream at once
            yield first
            async for event in events:
                yield event

    return StreamingResponse(replay(), media_type="text/event-stream")
