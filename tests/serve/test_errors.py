"""Every error in OpenAI's shape, with the status and the field it names; nothing changed."""

from __future__ import annotations

import httpx
import pytest

from kvshare.serve import ServeConfig

from factories import fingerprint
from serving import served

MSGS = [{"role": "user", "content": "Say something."}]


def shape(response, status: int, param: str | None = None, code: str | None = None) -> str:
    """The error's message, after checking OpenAI's shape, the status, param and code."""
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == ("invalid_request_error" if status in (400, 405, 413) else err["type"])
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err["message"]


def body(server, **fields):
    return {"model": server.state.model_id, "messages": MSGS, "max_tokens": 2, **fields}


def test_routing_errors_from_fastapi_itself_have_openai_shape(client):
    shape(client.get("/v1/nothing"), 404, code="not_found")
    shape(client.delete("/v1/chat/completions"), 405, code="method_not_allowed")
    shape(client.post("/v1/chat/completions", content=b"{not json"), 400)
    shape(client.post("/v1/chat/completions", json=[1, 2]), 400)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 2}, "n"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"logprobs": True}, "logprobs"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"max_completion_tokens": 3}, "max_tokens"),  # both given
        ({"temperature": 3.0}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"frobnicate": 1}, "frobnicate"),
        ({"tenant": "other"}, "tenant"),  # a tenant is never read from the body
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
def test_bad_and_unsupported_fields_are_400_naming_the_field(client, tiny_server, fields, param):
    before = fingerprint(tiny_server.state.engine)
    shape(client.post("/v1/chat/completions", json=body(tiny_server, **fields)), 400, param)
    assert fingerprint(tiny_server.state.engine) == before


def test_limits_of_the_model_and_the_server_name_the_limit(client, tiny_server):
    before = fingerprint(tiny_server.state.engine)
    cap = tiny_server.state.max_tokens_cap
    msg = shape(
        client.post("/v1/chat/completions", json=body(tiny_server, max_tokens=cap + 1)),
        400, "max_tokens",
    )  # fmt: skip
    assert str(cap) in msg
    ctx = tiny_server.state.engine.loaded.context_length
    long = [{"role": "user", "content": "ledger " * (ctx + 10)}]
    msg = shape(
        client.post("/v1/chat/completions", json=body(tiny_server, messages=long)),
        400, "messages", "context_length_exceeded",
    )  # fmt: skip
    assert str(ctx) in msg
    long_stream = body(tiny_server, messages=long, stream=True)
    shape(client.post("/v1/chat/completions", json=long_stream), 400, "messages")
    shape(client.post("/v1/chat/completions", json=body(tiny_server, model="gpt-4o")), 404, "model")
    assert fingerprint(tiny_server.state.engine) == before


def test_without_max_tokens_the_default_stays_under_the_cap(tiny_engine):
    with served(tiny_engine.fork(), ServeConfig(max_tokens_cap=3)) as server:
        plain = {"model": server.state.model_id, "messages": MSGS, "temperature": 0}
        r = httpx.post(f"{server.base}/v1/chat/completions", json=plain, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3
        over = httpx.post(f"{server.base}/v1/chat/completions", json={**plain, "max_tokens": 4})
        shape(over, 400, "max_tokens")


def test_a_body_over_the_cap_is_413(tiny_engine):
    with served(tiny_engine.fork(), ServeConfig(max_body_bytes=4096)) as server:
        big = body(server, messages=[{"role": "user", "content": "x" * 5000}])
        with httpx.Client(base_url=server.base) as c:
            shape(c.post("/v1/chat/completions", json=big), 413, code="body_too_large")

            def chunks():
                yield b'{"model": "m", "messages": [{"role": "user", "content": "'
                for _ in range(10):
                    yield b"y" * 1000
                yield b'"}]}'

            shape(c.post("/v1/chat/completions", content=chunks()), 413)
            assert c.get("/health").status_code == 200
        assert not server.state.engine.calls


def test_health_ready_and_metrics(client, tiny_server):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json()["status"] == "ready"
    client.post("/v1/chat/completions", json=body(tiny_server))
    client.post("/v1/chat/completions", json=body(tiny_server, n=3))
    text = client.get("/metrics").text
    for line in (
        'kvshare_requests_total{route="/v1/chat/completions",status="200"}',
        'kvshare_requests_total{route="/v1/chat/completions",status="400"}',
        'kvshare_prompt_tokens_total{kind="computed"}',
        'kvshare_store_bytes{store="segments"}',
        "kvshare_ttft_seconds_count",
        "kvshare_request_seconds_bucket",
        "kvshare_decode_batch_mean",
        "kvshare_requests_in_flight 0.0",
        "kvshare_queue_depth 0.0",
        'kvshare_tier_bytes{tier="',
    ):
        assert line in text, line
