"""``kvshare serve --replicas N``: the single server's app on N Ray Serve replicas.

Two deployments. ``ReplicaServer`` (N replicas, each one Engine): the whole app of
``kvshare.serve.app`` (API keys, per-tenant limits, metrics, errors; the keys come parsed in
the :class:`ReplicaSpec`, so a replica on another node needs no file) driven in process by
``kvshare.serve.bridge``; every answer carries ``X-KVShare-Replica`` (the replica's id) and
the replica reports ``record_routing_stats``: ``queue`` (admitted requests), ``waiting``
(those before their first token) and ``free_kv_bytes`` (store budgets left). ``Ingress``
(one replica, no engine): reads each HTTP request whole, computes its
:class:`~kvshare.serve.affinity.Route` and streams the chosen replica's answer back; its
handle routes with :class:`~kvshare.serve.ray_router.CacheAffinityRouter` (``router=
"affinity"``) or Ray's default power-of-two router (``"default"``). ``GET /metrics`` gathers
every replica's metrics with a ``replica`` label (affinity router; the default router cannot
pin a replica, so there it is one replica's). Limits are per replica: a tenant may have
``max_concurrent`` requests in flight on each. Imports Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from kvshare.config import EngineConfig
from kvshare.errors import ConfigError
from kvshare.serve import affinity
from kvshare.serve.affinity import Route, route_of
from kvshare.serve.bridge import HttpCall, call_app
from kvshare.serve.config import ServeConfig
from kvshare.serve.metrics import merge

ROUTER_PATH = "kvshare.serve.ray_router:CacheAffinityRouter"
ROUTERS = ("affinity", "default")
# How long /metrics waits for one replica's metrics. The replicas are asked one after another:
# calls a replica makes while serving a request inherit that request's internal id, and Ray
# Serve's router (without its FIFO mixin) matches routed replicas to pending requests by that
# id, so two concurrent calls from one ingress request could wait forever (seen with gather).
SCRAPE_S = 5.0


@dataclass(frozen=True)
class ReplicaSpec:
    """Everything a replica needs, picklable. model/device/dtype: as ``--model`` etc.;
    engine: the EngineConfig (a shared KV tier, when one exists, is named there); serve: the
    ServeConfig (its keys_file unused); keys: parsed key entries, None for no auth; router:
    one of :data:`ROUTERS`; threshold: the affinity router's load gap (requests); segments:
    leading messages hashed into a key without a session; cpus/gpus: per replica;
    max_ongoing: requests Ray sends one replica at once."""

    model: str | None = None
    device: str | None = None
    dtype: str | None = None
    engine: EngineConfig = EngineConfig()
    serve: ServeConfig = ServeConfig()
    keys: dict[str, Any] | None = None
    router: str = "affinity"
    threshold: int = 4
    segments: int = 2
    cpus: float = 1.0
    gpus: float = 0.0
    max_ongoing: int = 64

    def __post_init__(self) -> None:
        if self.router not in ROUTERS:
            raise ConfigError(f"router must be one of {ROUTERS}, got {self.router!r}")
        if self.threshold < 0 or self.segments < 1 or self.max_ongoing < 1:
            raise ConfigError("threshold >= 0, segments >= 1 and max_ongoing >= 1, got "
                              f"{self.threshold}, {self.segments}, {self.max_ongoing}")  # fmt: skip


def free_kv_bytes(engine: Any) -> int:
    """Bytes left under the prefix-cache and segment-store budgets (>= 0)."""
    mem, cfg = engine.memory(), engine.config.store
    left = cfg.prefix_cache_bytes - mem.prefix_cache + cfg.segment_store_bytes - mem.segments
    return max(0, int(left))


class ReplicaServer:
    """One engine behind the single server's app (module docstring)."""

    def __init__(self, spec: ReplicaSpec) -> None:
        from kvshare.engine.engine import Engine
        from kvshare.serve.app import create_app
        from kvshare.serve.auth import KeyChecker

        engine = Engine.from_pretrained(
            spec.model, device=spec.device, dtype=spec.dtype, config=spec.engine
        )
        self.app = create_app(engine, replace(spec.serve, keys_file=None))
        if spec.keys is not None:
            self.app.state.serve.keys = KeyChecker(spec.keys)
        self.id = serve.get_replica_context().replica_id.unique_id

    async def request(self, route: Route, call: HttpCall) -> AsyncIterator[dict]:
        """The answer to ``call`` as ``kvshare.serve.bridge.call_app`` messages."""
        async for message in call_app(self.app, call, {b"x-kvshare-replica": self.id.encode()}):
            yield message

    def record_routing_stats(self) -> dict[str, int]:
        state = self.app.state.serve
        return {
            "queue": state.limits.in_flight(),
            "waiting": state.limits.waiting,
            "free_kv_bytes": free_kv_bytes(state.engine),
        }


class Ingress:
    """The HTTP entry: every request to a replica by its route (module docstring)."""

    def __init__(self, replicas: Any, segments: int) -> None:
        self.replicas, self.segments = replicas, segments

    async def __call__(self, request: Request) -> Response:
        call = HttpCall(
            request.method, request.url.path, request.url.query.encode(),
            tuple(request.headers.raw), await request.body(),
        )  # fmt: skip
        if call.path == "/metrics" and call.method == "GET":
            return Response(await self.metrics(call), media_type="text/plain; version=0.0.4")
        stream = self.replicas.options(stream=True).request.remote(
            route_of(call, self.segments), call
        )
        head = await stream.__anext__()
        response = StreamingResponse(bodies(stream), status_code=head["status"])
        response.raw_headers = list(head["headers"])
        return response

    async def metrics(self, call: HttpCall) -> bytes:
        """Every replica's ``/metrics``, labelled by replica (module docstring)."""
        router = affinity.LIVE.get("ReplicaServer")
        pins = router.replica_ids() if router is not None else [None]
        texts: dict[str, bytes] = {}
        for pin in pins:  # one at a time: see SCRAPE_S
            with contextlib.suppress(TimeoutError):
                replica, text = await asyncio.wait_for(self.whole(Route("m", pin), call), SCRAPE_S)
                texts[replica] = text
        missing = len(pins) - len(texts)  # a replica that did not answer in SCRAPE_S
        tail = routing_gauges(router.reported()) if router else b""
        gauge = "# HELP kvshare_scrape_missing replicas whose metrics did not come in time\n"
        gauge += f"# TYPE kvshare_scrape_missing gauge\nkvshare_scrape_missing {missing}\n"
        return merge(texts) + tail + gauge.encode()

    async def whole(self, route: Route, call: HttpCall) -> tuple[str, bytes]:
        """(replica id, body) of one call, read whole."""
        replica, chunks = "", []
        async for message in self.replicas.options(stream=True).request.remote(route, call):
            head = dict(message.get("headers", ()))
            replica = head.get(b"x-kvshare-replica", replica.encode()).decode()
            chunks.append(message.get("body", b""))
        return replica, b"".join(chunks)


def routing_gauges(reported: dict[str, dict[str, Any]]) -> bytes:
    """The router's view as Prometheus gauges: ``kvshare_routing_<stat>{replica}`` for each
    stat a replica reported (queue, waiting, free_kv_bytes)."""
    names = sorted({k for stats in reported.values() for k in stats})
    lines = []
    for name in names:
        metric = f"kvshare_routing_{name}"
        lines += [f"# HELP {metric} {name} the replica last reported to the router",
                  f"# TYPE {metric} gauge"]  # fmt: skip
        lines += [f'{metric}{{replica="{rid}"}} {stats[name]}'
                  for rid, stats in reported.items() if name in stats]  # fmt: skip
    return "".join(line + "\n" for line in lines).encode()


async def bodies(stream: Any) -> AsyncIterator[bytes]:
    async for message in stream:
        yield message["body"]


def build_app(spec: ReplicaSpec, replicas: int) -> Any:
    """The Serve application: ``replicas`` ReplicaServers behind one Ingress."""
    if replicas < 1:
        raise ConfigError(f"--replicas must be >= 1, got {replicas}")
    router: dict[str, Any] = {
        "request_router_class": ROUTER_PATH,
        "request_router_kwargs": {"threshold": spec.threshold},
        "request_routing_stats_period_s": 1.0,
    }
    options: dict[str, Any] = {
        "name": "ReplicaServer", "num_replicas": replicas,
        "max_ongoing_requests": spec.max_ongoing,
        "ray_actor_options": {"num_cpus": spec.cpus, "num_gpus": spec.gpus},
    }  # fmt: skip
    if spec.router == "affinity":
        options["request_router_config"] = RequestRouterConfig(**router)
    backend: Any = serve.deployment(**options)(ReplicaServer)
    front: Any = serve.deployment(
        name="Ingress", num_replicas=1, max_ongoing_requests=1 << 12,
        ray_actor_options={"num_cpus": 0},
    )(Ingress)  # fmt: skip
    return front.bind(backend.bind(spec), spec.segments)
