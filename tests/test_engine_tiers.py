"""Engines over tiered trace stores: same outputs, disk restart reuse, hints and prefetch act."""

from __future__ import annotations

import pytest

from kvshare import Engine, EngineConfig
from kvshare.errors import ConfigError
from kvshare.tiered import TieredStore
from tests.factories import DOC, team

DOCS = [DOC, *(DOC.replace("ships", w) for w in ("whales", "boats", "yachts"))]


def engine(tiny_dirs, **options) -> Engine:
    config = EngineConfig.of(prefix_cache_bytes=0, **options)  # reuse only through traces
    return Engine.from_pretrained(str(tiny_dirs["llama"]), config=config)


def trace_bytes(tiny_dirs) -> int:
    """Bytes of one call's trace on the tiny model (one DOC prompt + 4 reply tokens)."""
    probe = engine(tiny_dirs, mode="blend")
    probe.chat(team("probe"), max_new_tokens=4)
    return probe.segments.bytes_used


def workflow(e: Engine, rounds: int = 2) -> list[tuple[str, int]]:
    out = []
    for r in range(rounds):
        for i, doc in enumerate(DOCS):
            res = e.chat(team(f"agent{i}", doc), agent=f"agent{i}", session="s", max_new_tokens=4)
            out.append((res.text, res.stats.computed_tokens))
        del r
    return out


@pytest.mark.parametrize("mode", ["blend", "kvshare"])
def test_a_tiny_device_tier_over_a_host_tier_gives_the_outputs_of_one_big_store(tiny_dirs, mode):
    one = trace_bytes(tiny_dirs)
    big = engine(tiny_dirs, mode=mode, eviction="lru")
    tiered = engine(
        tiny_dirs, mode=mode, segment_store_bytes=int(1.5 * one), host_tier_bytes=100 * one
    )
    assert isinstance(tiered.segments, TieredStore)
    assert workflow(big) == workflow(tiered)
    store = tiered.segments
    assert store.moves[("device", "host")] > 0 and store.moves[("host", "device")] > 0
    assert store.bytes_used <= store.budget_bytes and store.evictions == 0


def test_prefix_mode_with_tiers_equals_full(tiny_dirs):
    full = engine(tiny_dirs, mode="full")
    tiered = Engine.from_pretrained(
        str(tiny_dirs["llama"]), config=EngineConfig.of(mode="prefix", host_tier_bytes=1 << 20)
    )
    assert [t for t, _ in workflow(full)] == [t for t, _ in workflow(tiered)]


def test_a_disk_tier_survives_a_restart_and_a_new_engine_reuses_it(tiny_dirs, tmp_path):
    one = trace_bytes(tiny_dirs)
    opts = dict(mode="blend", segment_store_bytes=one, disk_tier_dir=str(tmp_path))
    first = engine(tiny_dirs, **opts)
    workflow(first, rounds=1)
    assert first.segments.tier_bytes()["disk"] > 0
    again = engine(tiny_dirs, **opts)  # a restart: nothing in memory
    res = again.chat(team("someone else", DOCS[0]), max_new_tokens=4)
    assert res.stats.relocated_tokens > 0 and again.segments.demand_misses["disk"] >= 1
    cold = engine(tiny_dirs, mode="blend", segment_store_bytes=one)
    assert cold.chat(team("someone else", DOCS[0]), max_new_tokens=4).text == res.text


def test_workflow_eviction_keeps_the_hinted_next_agents_trace_where_lru_demotes_it(tiny_dirs):
    one = trace_bytes(tiny_dirs)
    kept = {}
    for eviction in ("workflow", "lru"):
        e = engine(
            tiny_dirs,
            mode="blend",
            eviction=eviction,
            prefetch=False,
            segment_store_bytes=int(2.5 * one),
            host_tier_bytes=100 * one,
        )
        e.chat(team("agent0", DOCS[0]), agent="agent0", session="s", max_new_tokens=4)
        for i in (1, 2, 3):  # agent0 (the judge) runs again after these three
            e.hint("s", running=f"agent{i}", next=["agent0"])
            e.chat(team(f"agent{i}", DOCS[i]), agent=f"agent{i}", session="s", max_new_tokens=4)
        first = [k for k in e.segments._entries if ("s", "agent0") in e.segments._entries[k].users]
        kept[eviction] = e.segments.tier_of(first[0])
    assert kept == {"workflow": "device", "lru": "host"}


def test_a_hint_prefetches_the_next_agents_traces_before_they_run(tiny_dirs):
    one = trace_bytes(tiny_dirs)
    e = engine(
        tiny_dirs, mode="blend", segment_store_bytes=int(2.5 * one), host_tier_bytes=50 * one
    )
    for i, doc in enumerate(DOCS):
        e.chat(team(f"agent{i}", doc), agent=f"agent{i}", session="s", max_new_tokens=4)
    store = e.segments
    key = next(k for k, v in store._entries.items() if ("s", "agent0") in v.users)
    assert store.tier_of(key) == "host"
    e.hint("s", running="agent3", next=["agent0"], release=["agent1", "agent2"])
    assert e.prefetcher is not None and e.prefetcher.drain()
    assert store.tier_of(key) == "device" and e.prefetcher.promoted >= 1
    misses = store.demand_misses["host"]
    e.chat(team("agent0", DOCS[0]), agent="agent0", session="s", max_new_tokens=4)
    assert store.demand_misses["host"] == misses  # served from the device tier


def test_bad_tier_options_are_named_errors():
    with pytest.raises(ConfigError):
        EngineConfig.of(eviction="fifo")
    with pytest.raises(ConfigError):
        EngineConfig.of(host_tier_bytes=-1)
    with pytest.raises(ConfigError):
        EngineConfig.of(disk_tier_dir=3)
