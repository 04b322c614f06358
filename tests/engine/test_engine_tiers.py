"""Engines over tiered trace stores: same outputs, disk restart reuse, hints and prefetch act."""

from __future__ import annotations

import time

import pytest

from kvshare import Engine, EngineConfig
from kvshare.errors import ConfigError, ScopeError
from kvshare.store.tiered import TieredStore

from factories import DOC, team

DOCS = [DOC, *(DOC.replace("ships", w) for w in ("whales", "boats", "yachts"))]
WORDS = ("apple", "river", "engine", "violin")


def engine(tiny_dirs, **options) -> Engine:
    config = EngineConfig.of(prefix_cache_bytes=0, **options)  # reuse only through traces
    return Engine.from_pretrained(str(tiny_dirs["llama"]), config=config)


def trace_bytes(tiny_dirs, doc: str = DOC) -> int:
    """Bytes of one call's trace on the tiny model (one ``doc`` prompt + 4 reply tokens)."""
    probe = engine(tiny_dirs, mode="blend")
    probe.chat(team("probe", doc), max_new_tokens=4)
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


def test_workflow_eviction_keeps_the_next_agents_trace_where_lru_demotes_it(tiny_dirs):
    """Distinct documents (no call reads another's trace); the registered order says agent0
    runs right after agent3, so while agent3 runs agent0's trace is the one to keep."""
    docs = [f"Note {w}: the {w} report lists every {w} we counted this week. " * 6 for w in WORDS]
    one = trace_bytes(tiny_dirs, docs[0])
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
        e.chat(team("agent0", docs[0]), agent="agent0", session="s", max_new_tokens=4)
        e.register_workflow("s", ["agent1", "agent2", "agent3", "agent0"])
        for i in (1, 2, 3):
            e.hint("s", running=f"agent{i}")
            e.chat(team(f"agent{i}", docs[i]), agent=f"agent{i}", session="s", max_new_tokens=4)
        first = e.segments.keys_used_by([("s", "agent0")])
        kept[eviction] = e.segments.tier_of(first[0]), e.scheduler.steps("s", "agent0")
    assert kept == {"workflow": ("device", 1), "lru": ("host", float("inf"))}


def test_a_hint_prefetches_the_next_agents_traces_before_they_run(tiny_dirs):
    one = trace_bytes(tiny_dirs)
    e = engine(
        tiny_dirs, mode="blend", segment_store_bytes=int(2.5 * one), host_tier_bytes=50 * one
    )
    for i, doc in enumerate(DOCS):
        e.chat(team(f"agent{i}", doc), agent=f"agent{i}", session="s", max_new_tokens=4)
    store = e.segments
    key = store.keys_used_by([("s", "agent0")])[0]
    assert store.tier_of(key) == "host"
    e.hint("s", next=["agent0"], release=["agent1", "agent2"])  # nobody runs: at once
    assert e.prefetcher is not None and e.prefetcher.drain()
    assert store.tier_of(key) == "device" and e.prefetcher.promoted >= 1
    misses = store.demand_misses["host"]
    e.chat(team("agent0", DOCS[0]), agent="agent0", session="s", max_new_tokens=4)
    assert store.demand_misses["host"] == misses  # served from the device tier


def test_a_hint_naming_the_running_agent_waits_for_its_call_to_end(tiny_dirs):
    """The hint comes right before the running agent's call: what it asks for (a precompute
    of the next agent's prompt, moves on CPU) must not queue for the model ahead of that call."""
    e = engine(tiny_dirs, mode="prefix", segment_store_bytes=1 << 30, prefetch=True)
    started: list[float] = []
    real = e.precompute

    def recording(*args, **kwargs):
        started.append(time.perf_counter())
        return real(*args, **kwargs)

    e.precompute = recording  # type: ignore[method-assign]
    e.register_static("s", "writer", [{"role": "system", "content": "You write. " + DOC}])
    e.hint("s", running="reader", next=["writer"])
    assert e.prefetcher is not None and e.prefetcher.drain() and started == []  # parked
    before = time.perf_counter()
    r = e.chat(team("reader", DOCS[0]), agent="reader", session="s", max_new_tokens=4)
    assert e.prefetcher.drain() and len(started) == 1
    assert started[0] > before + r.stats.ttft_s  # after the call's first token, not before
    e.chat(team("other", DOCS[1]), agent="other", session="t", max_new_tokens=2)
    assert e.prefetcher.drain() and len(started) == 1  # another session's call: nothing parked


def test_bad_tier_options_are_named_errors():
    with pytest.raises(ConfigError):
        EngineConfig.of(eviction="fifo")
    with pytest.raises(ConfigError):
        EngineConfig.of(host_tier_bytes=-1)
    with pytest.raises(ConfigError):
        EngineConfig.of(disk_tier_dir=3)


def test_precompute_makes_the_next_call_an_exact_prefix_hit_and_is_not_a_call(tiny_dirs):
    e = Engine.from_pretrained(str(tiny_dirs["llama"]), config=EngineConfig(mode="prefix"))
    system = [{"role": "system", "content": "You are the archivist. " + DOC}]
    n = e.precompute(system, agent="archivist", session="s")
    assert n > 40 and e.stats().calls == 0 and e.memory().prefix_cache > 0
    msgs = [*system, {"role": "user", "content": "Which ships came?"}]
    hot = e.chat(msgs, agent="archivist", session="s", max_new_tokens=4)
    cold = Engine.from_pretrained(str(tiny_dirs["llama"]), config=EngineConfig(mode="full"))
    assert hot.stats.prefix_hit_tokens >= n - 4  # all but the generation header
    assert hot.text == cold.chat(msgs, max_new_tokens=4).text
    before = e.memory()
    with pytest.raises(ScopeError):
        e.precompute([{"role": "system", "content": "x"}], session=3)  # type: ignore[arg-type]
    assert e.memory() == before


def test_a_session_precomputes_the_next_agents_static_prompt_in_the_gap(tiny_dirs):
    from kvshare.agents import Agent, Session

    e = Engine.from_pretrained(str(tiny_dirs["llama"]), config=EngineConfig(mode="prefix"))
    agents = [Agent(n, f"You are the {n}. " + DOC, e) for n in ("reader", "writer")]
    with Session(agents, id="run", order=["reader", "writer"]) as s:
        assert e.prefetcher is not None and e.prefetcher.drain()
        assert e.prefetcher.warmed == 2  # the order: both agents are named next on entry
        cached = e.memory().prefix_cache
        first = s.chat("reader", "Summarise.", max_new_tokens=4)
        assert e.prefetcher.drain() and e.prefetcher.warmed == 3  # the writer, again: a no-op
        assert e.memory().prefix_cache > cached  # the reader's call, nothing more
        second = s.chat("writer", "Write it up.", max_new_tokens=4)
    assert first.stats.prefix_hit_tokens > 40 and second.stats.prefix_hit_tokens > 40
    assert e.stats().calls == 2


def test_traces_cut_to_heads_under_pressure_give_the_outputs_of_one_big_store(tiny_dirs):
    """Agents run again on new documents behind the same role prompts: the workflow policy
    cuts traces to the heads their writers read again (exact KV), the rest goes to the host
    tier, so nothing read differs from a store with room for everything."""

    def rounds(e: Engine) -> list[tuple[str, int]]:
        out = []
        for r in range(3):
            for i in range(3):
                e.hint("s", running=f"agent{i}", next=[f"agent{(i + 1) % 3}"])
                msgs = team(f"agent{i}", DOCS[(i + r) % len(DOCS)])
                res = e.chat(msgs, agent=f"agent{i}", session="s", max_new_tokens=4)
                out.append((res.text, res.stats.computed_tokens))
        return out

    one = trace_bytes(tiny_dirs)
    big = engine(tiny_dirs, mode="blend", eviction="lru")
    tiered = engine(
        tiny_dirs, mode="blend", segment_store_bytes=int(2.5 * one), host_tier_bytes=100 * one
    )
    assert rounds(big) == rounds(tiered)
    assert isinstance(tiered.segments, TieredStore) and tiered.segments.trims > 0
    assert tiered.segments.evictions == 0


def test_the_disk_tier_writes_behind_only_when_the_model_is_not_on_the_cpu(tiny_dirs, tmp_path):
    """On CPU a writer thread would take the next call's cores: the caller writes."""
    from kvshare.config import TiersConfig
    from kvshare.store.tiered import build_tiers

    e = engine(tiny_dirs, mode="blend", disk_tier_dir=str(tmp_path))
    assert e.segments.tiers[-1].name == "disk" and e.segments.tiers[-1].write_behind == 0
    cfg = TiersConfig(disk_tier_dir=str(tmp_path / "gpu"), disk_write_behind_bytes=1 << 20)
    tiers = build_tiers(cfg, 1 << 20, "meta", e.model)  # any accelerator: not "cpu"
    assert tiers[-1].write_behind == 1 << 20


def test_a_tenants_precomputed_static_prompt_serves_that_tenant_only(tiny_dirs):
    """X's session registers its agents' secret system prompts; the prefetcher precomputes
    them in X's scope: X's next agent hits them, a call of tenant None or Y with the same
    prompt gets nothing (it used to: the precompute ran with tenant None)."""
    from kvshare.agents import Agent, Session

    e = Engine.from_pretrained(str(tiny_dirs["llama"]), config=EngineConfig(mode="prefix"))
    secret = "You are the reader. The vault code is 4417. " + DOC
    agents = [Agent("reader", secret, e), Agent("writer", "You are the writer. " + DOC, e)]
    with Session(agents, id="run", order=["reader", "writer"], tenant="X") as s:
        assert e.prefetcher is not None and e.prefetcher.drain() and e.prefetcher.warmed == 2
        probe = agents[0].messages("Summarise.")
        for other in (None, "Y"):
            leak = e.chat(probe, agent="reader", session="run", tenant=other, max_new_tokens=2)
            assert leak.stats.prefix_hit_tokens == 0, other
        own = s.chat("reader", "Summarise.", max_new_tokens=2)
    assert own.stats.prefix_hit_tokens > 40
    assert [h.tenant for h in e.hints("run")] == ["X", "X", "X"]


def test_static_prompts_and_hints_of_one_session_id_stay_per_tenant(tiny_dirs):
    e = Engine.from_pretrained(str(tiny_dirs["llama"]), config=EngineConfig(mode="prefix"))
    e.register_static("run", "reader", [{"role": "system", "content": "X's. " + DOC}], "X")
    e.hint("run", next=["reader"], tenant="Y")  # Y names X's agent: nothing to precompute
    assert e.prefetcher is not None and e.prefetcher.drain() and e.prefetcher.warmed == 0
    e.hint("run", next=["reader"], tenant="X")
    assert e.prefetcher.drain() and e.prefetcher.warmed == 1
    with pytest.raises(ScopeError):
        e.register_static("run", "reader", [], tenant="bad\ud800id")
    with pytest.raises(ScopeError):
        e.hint("run", next=["reader"], tenant=7)  # type: ignore[arg-type]
