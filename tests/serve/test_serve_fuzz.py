"""Fuzzed request bodies (hypothesis): every answer is a 2xx or a 4xx in OpenAI's shape, never
a 500, and a 4xx changes nothing in the engine. ``KVSHARE_FUZZ_EXAMPLES`` sets the count
(small in ``make test``; the issue's figure: 1,000)."""

from __future__ import annotations

import json
import os
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvshare.serve import ServeConfig

from factories import fingerprint
from serving import served

EXAMPLES = int(os.environ.get("KVSHARE_FUZZ_EXAMPLES", "60"))
FIELDS = [
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed",
    "stop", "stream", "stream_options", "tools", "tool_choice", "n", "response_format",
    "logprobs", "logit_bias", "presence_penalty", "user", "prompt_cache_key", "metadata",
    "tenant", "store", "parallel_tool_calls",
]  # fmt: skip
ROLES = ["system", "developer", "user", "assistant", "tool", "function", ""]

scalars = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False) | st.text(max_size=12)
)  # fmt: skip
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(ROLES)},
        optional={"content": st.text(max_size=20) | values, "tool_calls": values,
                  "tool_call_id": values, "name": values},
    ),
    max_size=3,
)  # fmt: skip


HINT_FIELDS = ["session", "running", "next", "release", "ttl", "tenant"]


@st.composite
def bodies(draw: Any, valid: dict[str, Any], fields: list[str]) -> Any:
    """``valid`` with one to three fields replaced, dropped or added; or any JSON."""
    if draw(st.integers(0, 9)) == 0:
        return draw(values)
    body = dict(valid)
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(fields) | st.text(max_size=8))
        if draw(st.booleans()) and name in body:
            del body[name]
        else:
            body[name] = draw(messages if name == "messages" else values)
    return body


@pytest.fixture(scope="module")
def fuzz_server(tiny_engine):
    with served(tiny_engine.fork(), ServeConfig(max_tokens_cap=4)) as server:
        yield server


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/kvshare/hints"])
def test_fuzzed_bodies_never_500_and_4xx_change_nothing(fuzz_server, route):
    engine = fuzz_server.state.engine
    if route.endswith("hints"):
        valid, fields = {"session": "s", "running": "a", "next": ["b"]}, HINT_FIELDS
    else:
        valid = {"model": fuzz_server.state.model_id, "max_tokens": 1,
                 "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
        fields = FIELDS
    counts: dict[int, int] = {}

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(body=bodies(valid, fields))
    def check(body: Any) -> None:
        before = (fingerprint(engine), len(engine.hints()))
        data = json.dumps(body).encode()
        r = httpx.post(f"{fuzz_server.base}{route}", content=data, timeout=60,
                       headers={"content-type": "application/json"})  # fmt: skip
        counts[r.status_code] = counts.get(r.status_code, 0) + 1
        assert r.status_code < 500, (body, r.text)
        assert fuzz_server.state.limits.in_flight() == 0
        if r.status_code >= 400:
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"}, r.text
            assert (fingerprint(engine), len(engine.hints())) == before, body

    check()
    assert sum(v for k, v in counts.items() if k >= 400) > EXAMPLES // 2  # mostly refused
    print(f"fuzz {route}: {sum(counts.values())} bodies, statuses {sorted(counts.items())}")
