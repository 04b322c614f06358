"""Tenants come from API keys alone: keys file, 401s, isolation, nothing in a body selects one."""

from __future__ import annotations

import json

import httpx
import pytest

from kvshare.cli import main
from kvshare.serve import ServeConfig
from kvshare.serve.auth import AuthError, KeyChecker, add_key, read_keys
from kvshare.serve.run import UnsafeBindError, check_bind

from factories import DOC
from serving import served


def test_keys_file_keeps_salted_hashes_never_the_key(tmp_path):
    path = tmp_path / "keys.json"
    a, b = add_key(path, "alice"), add_key(path, "alice")
    text = path.read_text()
    secret = a.split("_", 2)[2]  # the secret may hold "_" itself
    assert a != b and secret not in text and a not in text
    rows = json.loads(text)["keys"]
    assert len({r["salt"] for r in rows}) == 2 and len({r["hash"] for r in rows}) == 2
    checker = KeyChecker(read_keys(path))
    assert checker.tenant(f"Bearer {a}") == checker.tenant(f"bearer {b}") == "alice"
    forged = a[:-1] + ("A" if a[-1] != "A" else "B")  # right id, wrong secret
    for bad in (None, "", "Bearer", f"Basic {a}", f"Bearer {forged}", "Bearer kvs_00000000_x"):
        with pytest.raises(AuthError):
            checker.tenant(bad)
    with pytest.raises(Exception, match="tenant name"):
        add_key(path, "bad name/..")
    assert len(read_keys(path)) == 2  # the bad name added nothing


def test_cli_keys_add_prints_a_working_key_once(tmp_path, capsys):
    path = tmp_path / "k.json"
    assert main(["serve", "keys", "add", "bob", "--keys", str(path)]) == 0
    out = capsys.readouterr()
    key = out.out.strip()
    assert key.startswith("kvs_") and "bob" in out.err and key not in out.err
    assert KeyChecker(read_keys(path)).tenant(f"Bearer {key}") == "bob"


def test_no_auth_is_refused_off_loopback(capsys):
    check_bind("127.0.0.1", ServeConfig())
    check_bind("::1", ServeConfig())
    with pytest.raises(UnsafeBindError, match="loopback"):
        check_bind("0.0.0.0", ServeConfig())
    check_bind("0.0.0.0", ServeConfig(keys_file="k.json"))  # keys: any host
    assert main(["serve", "--no-auth", "--host", "0.0.0.0", "--model", "random:nope"]) == 2
    assert "loopback" in capsys.readouterr().err
    assert main(["serve", "--model", "random:nope"]) == 2  # neither keys nor --no-auth
    assert "--no-auth" in capsys.readouterr().err


@pytest.fixture(scope="module")
def keyed(tiny_engine, tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    keys = {name: add_key(path, name) for name in ("alice", "bob")}
    with served(tiny_engine.fork(), ServeConfig(keys_file=str(path))) as server:
        yield server, keys


def post(server, key: str | None, **extra):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    payload = {"model": server.state.model_id, "messages": [{"role": "user", "content": DOC}],
               "max_tokens": 2, "temperature": 0, **extra}  # fmt: skip
    return httpx.post(
        f"{server.base}/v1/chat/completions", json=payload, headers=headers, timeout=60
    )


def test_missing_or_unknown_key_is_401_and_runs_nothing(keyed):
    server, keys = keyed
    calls = len(server.state.engine.calls)
    for key in (None, "kvs_deadbeef_" + "A" * 43, keys["alice"] + "x"):
        r = post(server, key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer"
    r = httpx.get(f"{server.base}/v1/models")
    assert r.status_code == 401
    r = httpx.post(f"{server.base}/v1/kvshare/hints", json={"session": "s"})
    assert r.status_code == 401
    assert len(server.state.engine.calls) == calls


def test_tenant_is_the_keys_and_kv_never_crosses_tenants(keyed):
    """alice's identical prompt is a prefix hit for alice only; bob's first call computes
    everything, whatever the body says about tenants."""
    server, keys = keyed
    engine = server.state.engine
    first = post(server, keys["alice"]).json()
    again = post(server, keys["alice"]).json()
    meta = {"kvshare_agent": "x", "tenant": "alice", "kvshare_tenant": "alice"}
    bob = post(server, keys["bob"], metadata=meta, user="alice").json()
    assert first["usage"]["kvshare"]["tenant"] == "alice"
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert bob["usage"]["kvshare"]["tenant"] == "bob"
    assert bob["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert [c.tenant for c in engine.calls[-3:]] == ["alice", "alice", "bob"]
    assert post(server, keys["bob"], tenant="alice").status_code == 400
    header = {"X-KVShare-Tenant": "alice"}
    r = httpx.post(
        f"{server.base}/v1/chat/completions",
        json={"model": server.state.model_id, "messages": [{"role": "user", "content": DOC}],
              "max_tokens": 2},
        headers={"Authorization": f"Bearer {keys['bob']}", **header}, timeout=60,
    )  # fmt: skip
    assert r.json()["usage"]["kvshare"]["tenant"] == "bob"


def test_hints_are_recorded_under_the_keys_tenant(keyed):
    server, keys = keyed
    auth = {"Authorization": f"Bearer {keys['bob']}"}
    r = httpx.post(
        f"{server.base}/v1/kvshare/hints",
        json={"session": "wf1", "running": "planner", "next": ["critic", "writer"]},
        headers=auth,
    )
    assert r.status_code == 200 and r.json()["next"] == ["critic", "writer"]
    hint = server.state.engine.hints("wf1")[-1]
    assert hint.tenant == "bob" and hint.next == ("critic", "writer")
    bad = httpx.post(f"{server.base}/v1/kvshare/hints", json={"session": "wf1", "ttl": -1},
                     headers=auth)  # fmt: skip
    assert bad.status_code == 400 and len(server.state.engine.hints("wf1")) == 1
    post(server, keys["bob"], metadata={"kvshare_agent": "critic", "kvshare_session": "wf1",
                                        "kvshare_next": "writer"})  # fmt: skip
    hint = server.state.engine.hints("wf1")[-1]
    assert (hint.running, hint.next, hint.tenant) == ("critic", ("writer",), "bob")
    kept = len(server.state.engine.hints())
    refused = post(server, keys["bob"], messages=[{"role": "user", "content": "ledger " * 5000}],
                   metadata={"kvshare_session": "wf1", "kvshare_next": "judge"})  # fmt: skip
    no_session = post(server, keys["bob"], metadata={"kvshare_next": "judge"})
    assert refused.status_code == no_session.status_code == 400
    assert no_session.json()["error"]["param"] == "metadata.kvshare_next"
    assert len(server.state.engine.hints()) == kept  # a refused call leaves no hint
