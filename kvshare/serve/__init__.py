"""``kvshare serve``: an OpenAI-compatible HTTP endpoint over one Engine (FastAPI + uvicorn).

Wing: apps (a peer of integrations, bench, agents: may import them and every wing below;
the CLI imports it). Parts: ``app`` (the app factory,
routes), ``chat`` (one chat request, whole or streamed), ``convert`` (OpenAI shapes <-> engine
calls), ``schema`` (request bodies), ``auth`` (API keys -> tenants), ``limits`` (per-tenant
backpressure), ``errors`` (OpenAI's error shape), ``middleware`` (body cap, status counts),
``metrics`` (Prometheus), ``config`` (ServeConfig, config files), ``run`` (uvicorn, drain),
``remote`` (a reference team through ChatOpenAI against a server). ``kvshare serve
--replicas N`` (Ray Serve, imported only then): ``ray_app`` (the deployments), ``ray_router``
(the cache-affinity request router), ``ray_cluster`` (a local Ray or a cluster), ``bridge``
(a request through the app in process), ``affinity`` (a request's routing key).
"""

from __future__ import annotations

from kvshare.serve.app import create_app
from kvshare.serve.config import ServeConfig

__all__ = ["ServeConfig", "create_app"]
