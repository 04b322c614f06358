"""The affinity key of a request to ``kvshare serve --replicas``: what keeps a workflow on
one replica (pure; the Ray ingress computes it, ``kvshare.serve.ray_router`` routes by it).

The key is the caller (a hash of its ``Authorization`` header: two tenants' sessions of the
same name are different keys) plus, first found: the session (``X-KVShare-Session``, then
``metadata.kvshare_session``, then ``prompt_cache_key``, then a hints body's ``session``),
else hashes of the request's first ``segments`` messages (their text), else the path. A
body that is not JSON routes by the caller and path (the replica answers its 400).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from kvshare.sched.routing import stable_hash
from kvshare.serve.bridge import HttpCall

# The affinity routers alive in this process, by deployment name (the ingress's /metrics
# fan-out). Here, not in kvshare.serve.ray_router: Ray Serve ships a router's module by value
# (cloudpickle), so that module's own globals are a private copy in every process.
LIVE: dict[str, Any] = {}


@dataclass(frozen=True)
class Route:
    """What the request router reads: the affinity ``key``; ``pin``: a replica id that must
    serve it (the ingress's per-replica fan-out, e.g. ``/metrics``), or None."""

    key: str
    pin: str | None = None


def route_of(call: HttpCall, segments: int = 2) -> Route:
    """The :class:`Route` of ``call`` (module docstring); ``segments`` >= 1."""
    caller = f"{stable_hash(call.header('authorization') or ''):016x}"
    body = _json(call.body)
    session = call.header("x-kvshare-session") or _session(body)
    if session:
        return Route(f"{caller}|s:{session}")
    messages = body.get("messages")
    if isinstance(messages, list) and messages:
        lead = [f"{stable_hash(_text(m)):016x}" for m in messages[:segments]]
        return Route(f"{caller}|m:{','.join(lead)}")
    return Route(f"{caller}|p:{call.path}")


def _json(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _session(body: dict[str, Any]) -> str | None:
    meta = body.get("metadata")
    found = meta.get("kvshare_session") if isinstance(meta, dict) else None
    found = found or body.get("prompt_cache_key") or body.get("session")
    return found if isinstance(found, str) else None


def _text(message: Any) -> str:
    """A message's role and text content (parts joined); anything else as JSON."""
    if not isinstance(message, dict):
        return json.dumps(message, sort_keys=True, default=str)
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return f"{message.get('role')}:{content}"
