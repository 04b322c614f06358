"""The pure halves of ``kvshare serve --replicas``: the in-process ASGI bridge, the affinity
key, the merged metrics (no Ray)."""

from __future__ import annotations

import asyncio
import json

from kvshare.serve import ServeConfig, create_app
from kvshare.serve.affinity import route_of
from kvshare.serve.bridge import HttpCall, call_app
from kvshare.serve.metrics import merge


def http(path: str, body: dict | None = None, **headers: str) -> HttpCall:
    raw = json.dumps(body).encode() if body is not None else b""
    if body is not None:
        headers.setdefault("content_type", "application/json")
    pairs = tuple((k.replace("_", "-").encode(), v.encode()) for k, v in headers.items())
    return HttpCall("POST" if body is not None else "GET", path, b"", pairs, raw)


async def collect(app, call: HttpCall) -> tuple[dict, bytes]:
    got = [m async for m in call_app(app, call, {b"x-kvshare-replica": b"r1"})]
    return got[0], b"".join(m.get("body", b"") for m in got[1:])


def test_bridge_answers_whole_streamed_and_refused_calls_like_the_server(tiny_engine):
    app = create_app(tiny_engine.fork(), ServeConfig())
    model = app.state.serve.model_id
    ask = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    head, body = asyncio.run(collect(app, http("/v1/chat/completions", ask)))
    assert head["status"] == 200 and (b"x-kvshare-replica", b"r1") in head["headers"]
    assert json.loads(body)["object"] == "chat.completion"
    head, body = asyncio.run(collect(app, http("/v1/chat/completions", {**ask, "stream": True})))
    assert head["status"] == 200 and body.endswith(b"data: [DONE]\n\n")
    assert b"content-length" not in dict(head["headers"])
    head, body = asyncio.run(collect(app, http("/v1/chat/completions", {**ask, "model": "x"})))
    assert head["status"] == 404 and b"model_not_found" in body


def test_route_key_is_the_session_else_the_leading_messages():
    msgs = [{"role": "system", "content": "doc"}, {"role": "user", "content": "q1"}]
    a = route_of(http("/v1/chat/completions", {"messages": msgs}, x_kvshare_session="wf"))
    b = route_of(http("/v1/chat/completions", {"messages": msgs[:1], "metadata": {
        "kvshare_session": "wf"}}))  # fmt: skip
    c = route_of(http("/v1/kvshare/hints", {"session": "wf"}))
    assert a == b == c and a.key.endswith("|s:wf") and a.pin is None
    other = route_of(http("/v1/chat/completions", {"messages": msgs}, authorization="Bearer k"))
    assert other.key != route_of(http("/v1/chat/completions", {"messages": msgs})).key
    lead = [route_of(http("/x", {"messages": [*msgs, {"role": "user", "content": q}]}))
            for q in ("q2", "q3")]  # fmt: skip
    assert lead[0] == lead[1]  # same first two messages: same key
    assert route_of(http("/x", {"messages": msgs[::-1]})) != lead[0]
    assert route_of(HttpCall("POST", "/v1/x", b"", (), b"{not json")).key.endswith("|p:/v1/x")


def test_merged_metrics_label_every_sample_and_keep_families_together():
    one = (b"# HELP a_total n\n# TYPE a_total counter\na_total{route=\"/x\"} 1.0\n"
           b"# HELP b g\n# TYPE b gauge\nb 2.0\n")  # fmt: skip
    text = merge({"r1": one, "r2": one}).decode().splitlines()
    assert text == [
        "# HELP a_total n", "# TYPE a_total counter", 'a_total{replica="r1",route="/x"} 1.0',
        'a_total{replica="r2",route="/x"} 1.0', "# HELP b g", "# TYPE b gauge",
        'b{replica="r1"} 2.0', 'b{replica="r2"} 2.0',
    ]  # fmt: skip


def test_replica_options_are_checked_before_ray_starts(capsys):
    import pytest

    from kvshare.cli import main
    from kvshare.errors import ConfigError
    from kvshare.serve.ray_app import ReplicaSpec

    assert main(["serve", "--replicas", "0", "--no-auth"]) == 2
    assert "--replicas must be >= 1" in capsys.readouterr().err
    assert main(["serve", "--replicas", "2", "--no-auth", "--host", "0.0.0.0"]) == 2
    assert "loopback" in capsys.readouterr().err
    for bad in ({"router": "random"}, {"threshold": -1}, {"segments": 0}):
        with pytest.raises(ConfigError):
            ReplicaSpec(**bad)


def test_routing_stats_report_queue_and_free_kv_falling_as_the_stores_fill(tiny_engine):
    from kvshare.serve.ray_app import ReplicaServer

    replica = ReplicaServer.__new__(ReplicaServer)  # its app, without Ray's replica context
    replica.app = create_app(tiny_engine.fork(), ServeConfig())
    empty = replica.record_routing_stats()
    cfg = replica.app.state.serve.engine.config.store
    assert empty == {"queue": 0, "waiting": 0,
                     "free_kv_bytes": cfg.prefix_cache_bytes + cfg.segment_store_bytes}  # fmt: skip
    replica.app.state.serve.engine.chat([{"role": "user", "content": "fill"}], max_new_tokens=2)
    assert 0 <= replica.record_routing_stats()["free_kv_bytes"] < empty["free_kv_bytes"]
