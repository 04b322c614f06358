"""Two engines (replicas) that share only a real Redis server: engine B reuses the KV of a
document engine A prefilled, within the fidelity bar of a full prefill; other tenants' KV is
never a candidate; a server killed mid-workflow costs reuse, never a call."""

from __future__ import annotations

import pytest

from kvshare import Engine, EngineConfig
from kvshare.store.tiered import TieredStore

from factories import DOC, team

BAR_KL = 0.02  # EngineConfig.target_kl: the fidelity bar kvshare mode aims at


def replica(tiny_dirs, url: str, key_file: str, mode: str = "kvshare") -> Engine:
    radix = {} if mode == "prefix" else {"prefix_cache_bytes": 0}  # else: traces only
    config = EngineConfig.of(mode=mode, shared_tier=url, shared_key_file=key_file, **radix)
    return Engine.from_pretrained(str(tiny_dirs["llama"]), config=config)


@pytest.fixture()
def pair(tiny_dirs, redis_server, tmp_path):
    key = str(tmp_path / "shared.key")
    return replica(tiny_dirs, redis_server.url, key), replica(tiny_dirs, redis_server.url, key)


def test_engine_b_reuses_what_engine_a_prefilled_through_redis(pair):
    a, b = pair
    assert isinstance(b.segments, TieredStore) and b.segments.shared is not None
    a.chat(team("planner"), agent="planner", tenant="acme", session="s1", max_new_tokens=3)
    assert a.segments.shared.stats()["puts"] >= 1
    res = b.chat(
        team("critic"), agent="critic", tenant="acme", session="s1", max_new_tokens=3, shadow=True
    )
    s = res.stats
    assert b.segments.adopted >= 1 and s.relocated_tokens > 0
    assert s.reuse_rate > 0.5, s
    assert s.kl is not None and s.kl <= BAR_KL and s.top1_agree


def test_another_tenants_kv_is_never_a_candidate(pair):
    a, b = pair
    a.chat(team("planner"), agent="planner", tenant="acme", max_new_tokens=3)
    res = b.chat(team("critic"), agent="critic", tenant="globex", max_new_tokens=3)
    assert b.segments.adopted == 0 and res.stats.relocated_tokens == 0
    assert res.stats.prefix_hit_tokens == 0


def test_redis_killed_mid_workflow_every_call_succeeds(pair, redis_server):
    a, b = pair
    a.chat(team("planner"), agent="planner", tenant="acme", max_new_tokens=3)
    redis_server.stop()
    cold = b.chat(team("critic"), agent="critic", tenant="acme", max_new_tokens=3)
    assert cold.stats.relocated_tokens == 0 and b.segments.shared.stats()["failures"] >= 1
    redis_server.start()  # empty: A writes again, B reads again
    a.segments.clear()
    a.chat(team("planner", DOC + " More."), agent="planner", tenant="acme", max_new_tokens=3)
    import time

    time.sleep(0.6)  # the tier's pause after a failure
    warm = b.chat(team("judge", DOC + " More."), agent="judge", tenant="acme", max_new_tokens=3)
    assert warm.stats.relocated_tokens > 0
    assert b.segments.shared.stats()["reconnects"] >= 1


def _taught(a: Engine, tenant: str = "acme") -> int:
    a.chat(team("planner"), agent="planner", tenant=tenant, max_new_tokens=3)
    a.chat(team("critic"), agent="critic", tenant=tenant, max_new_tokens=3, shadow=True, teach=True)
    return len(a.anchor_pool(tenant=tenant))


def test_anchor_pools_are_shared_per_scope_through_redis(pair, redis_server):
    a, b = pair
    learned = _taught(a)
    assert learned > 0 and a.parts.learned.shared.written >= 1
    assert len(b.anchor_pool(tenant="acme")) == learned  # read on B's miss, verified
    assert b.parts.learned.shared.loaded == 1
    assert len(b.anchor_pool(tenant="globex")) == 0  # another tenant's pool never crosses


def test_a_tampered_shared_pool_is_rejected_and_deleted(tiny_dirs, pair, redis_server, tmp_path):
    a, _ = pair
    _taught(a)
    raw = redis_server.client()
    (name,) = raw.keys("kvshare:pool:*")
    value = bytearray(raw.get(name))
    value[-40] ^= 1  # inside the pool file: fails the seal (and its sha256)
    raw.set(name, bytes(value))
    c = replica(tiny_dirs, redis_server.url, str(tmp_path / "shared.key"))
    assert len(c.anchor_pool(tenant="acme")) == 0
    assert c.segments.shared.stats()["corrupt"] == 1 and not raw.exists(name)


def test_a_sealed_blob_that_is_no_pool_file_is_rejected(tiny_dirs, pair, redis_server, tmp_path):
    a, _ = pair
    _taught(a)
    scope = a._named_scope("acme", None)
    assert a.segments.shared.put_blob("pool", scope, b"KVSPOOL\0" + bytes(100))  # right seal
    c = replica(tiny_dirs, redis_server.url, str(tmp_path / "shared.key"))
    assert len(c.anchor_pool(tenant="acme")) == 0 and c.parts.learned.shared.rejected == 1
    assert c.segments.shared.get_blob("pool", scope) is None  # deleted


def test_prefix_mode_replicas_share_exact_prefixes(tiny_dirs, redis_server, tmp_path):
    key = str(tmp_path / "shared.key")
    a, b = (replica(tiny_dirs, redis_server.url, key, mode="prefix") for _ in "ab")
    full = replica(tiny_dirs, redis_server.url, key, mode="full")
    a.chat(team("planner"), agent="planner", tenant="acme", max_new_tokens=3)
    follow_up = [{"role": "assistant", "content": "Noted."}, {"role": "user", "content": "Why?"}]
    msgs = team("planner", extra=follow_up)
    res = b.chat(msgs, agent="planner", tenant="acme", max_new_tokens=6)
    assert res.stats.prefix_hit_tokens > 32 and b.parts.exact_shared.stats()["hits"] >= 1
    assert res.tokens == full.chat(msgs, tenant="acme", max_new_tokens=6).tokens  # exact
    assert redis_server.client().keys("kvshare:seg:*") == []  # its own namespace only
