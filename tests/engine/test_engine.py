"""Engine on a tiny random model: prefix == full, scoping, stats, bad input, threads."""

from __future__ import annotations

import threading

import pytest
import torch

from kvshare import Engine, EngineConfig
from kvshare.errors import ConfigError, ContextLengthError, PromptError
from kvshare.model.prompt import render, token_hash
from kvshare.scope import Scope

from conftest import DEVICES

TENANT_SCOPE = Scope("tenant")  # the scope of calls without a tenant id

SYSTEM = {"role": "system", "content": "You are a careful planner. " * 8}


def conversation(turns: int) -> list[dict[str, str]]:
    msgs = [SYSTEM]
    for i in range(turns):
        msgs.append({"role": "user", "content": f"Step {i}: list three risks of plan {i}."})
        if i < turns - 1:
            msgs.append({"role": "assistant", "content": f"Risk {i}a, risk {i}b, risk {i}c."})
    return msgs


@pytest.fixture()
def engines(tiny_engine):
    return tiny_engine.fork(mode="full"), tiny_engine.fork(mode="prefix")


def test_prefix_equals_full_and_reuses(engines):
    full, prefix = engines
    for turns in (1, 2, 3):
        a = full.chat(conversation(turns), max_new_tokens=6)
        b = prefix.chat(conversation(turns), max_new_tokens=6)
        assert a.tokens == b.tokens
        s = b.stats
        assert s.prefix_hit_tokens + s.relocated_tokens + s.computed_tokens == s.prompt_tokens
        if turns > 1:
            assert s.prefix_hit_tokens > len(SYSTEM["content"]) // 8
    assert full.stats().reuse_rate == 0.0 and prefix.stats().reuse_rate > 0.3


def test_every_call_leaves_one_trace_with_its_reply(tiny_engine):
    prefix = tiny_engine.fork(mode="blend")  # traces are kept where they are read: relocation
    before = len(prefix.segments)
    r = prefix.chat(conversation(2), max_new_tokens=5, agent="planner")
    prompt = render(prefix.tokenizer, conversation(2))
    ids = tuple(prompt.ids) + tuple(r.tokens[:-1])
    trace = prefix.segments.get(TENANT_SCOPE, token_hash(ids), ids)
    assert trace is not None and trace.kind == "trace" and trace.agent == "planner"
    assert trace.kv.length == len(ids) and len(prefix.segments) == before + 1
    assert trace.slot_at(0) == "m0" and trace.slot_at(len(ids) - 1) == "reply"
    assert trace.slot_at(prompt.segments[1].start) == "m1"
    prefix.chat(conversation(2), max_new_tokens=5, agent="planner")  # same call: no new trace
    assert len(prefix.segments) == before + 1


def test_tenants_never_share(tiny_engine):
    eng = tiny_engine.fork(mode="prefix", share_scope="tenant")
    eng.chat(conversation(1), tenant="a", max_new_tokens=2)
    assert eng.chat(conversation(1), tenant="b", max_new_tokens=2).stats.prefix_hit_tokens == 0
    assert eng.chat(conversation(1), tenant="a", max_new_tokens=2).stats.prefix_hit_tokens > 0
    glob = tiny_engine.fork(mode="prefix", share_scope="global")
    glob.chat(conversation(1), tenant="a", max_new_tokens=2)
    assert glob.chat(conversation(1), tenant="b", max_new_tokens=2).stats.prefix_hit_tokens > 0


def test_session_scope(tiny_engine):
    eng = tiny_engine.fork(mode="prefix", share_scope="session")
    eng.chat(conversation(1), session="s1", max_new_tokens=2)
    assert eng.chat(conversation(1), session="s2", max_new_tokens=2).stats.prefix_hit_tokens == 0
    assert eng.chat(conversation(1), session="s1", max_new_tokens=2).stats.prefix_hit_tokens > 0
    assert eng.stats(session="s1").calls == 2


def test_shadow_fidelity_of_prefix_mode(engines):
    _, prefix = engines
    prefix.chat(conversation(1), max_new_tokens=4)
    r = prefix.chat(conversation(2), max_new_tokens=4, shadow=True)
    assert r.stats.kl is not None and r.stats.kl < 1e-6
    assert r.stats.top1_agree and r.stats.greedy_match == 32


def test_sampling_is_seeded(engines):
    full, _ = engines
    a = full.chat(conversation(1), max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    b = full.chat(conversation(1), max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    assert a.tokens == b.tokens


def test_top_p_keeps_the_nucleus_with_fixed_shapes():
    """The masked top-p equals the boolean-indexed definition, draw for draw."""
    from kvshare.engine.decode import SamplingParams, sample

    logits = torch.randn(500, generator=torch.Generator().manual_seed(3)) * 4
    params = SamplingParams(temperature=0.8, top_p=0.7, seed=1)
    probs = torch.softmax((logits - logits.max()) / 0.8, dim=-1)
    sorted_p, order = probs.sort(descending=True)
    keep = sorted_p.cumsum(-1) - sorted_p < 0.7
    nucleus = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    for seed in range(20):
        race = torch.empty(500).exponential_(generator=torch.Generator().manual_seed(seed))
        assert sample(logits, params, torch.Generator().manual_seed(seed)) == int(
            (nucleus / race).argmax()
        )


def test_a_seeded_draw_follows_the_distribution():
    """The exponential race draws token i with probability p_i: 4,000 seeded draws from a
    4-token distribution land within 3 standard errors of it."""
    from kvshare.engine.decode import SamplingParams, sample

    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    params = SamplingParams(temperature=1.0, seed=0)
    n = 4000
    draws = [sample(p.log(), params, torch.Generator().manual_seed(s)) for s in range(n)]
    freq = torch.bincount(torch.tensor(draws), minlength=4).double() / n
    assert ((freq - p.double()).abs() <= 3 * (p * (1 - p) / n).sqrt().double()).all()


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_sampling_runs_on_the_logits_device(tiny_dirs, device):
    """The call's generator lives on the CPU; draws from logits on another device use it
    there (a CPU generator with CUDA logits made torch.multinomial raise)."""
    from kvshare.engine.decode import SamplingParams, sample

    logits = torch.randn(64, generator=torch.Generator().manual_seed(0)).to(device)
    params = SamplingParams(temperature=1.0, seed=5)
    draws = [sample(logits, params, torch.Generator().manual_seed(s)) for s in range(8)]
    cpu = [sample(logits.cpu(), params, torch.Generator().manual_seed(s)) for s in range(8)]
    assert draws == cpu
    engine = Engine.from_pretrained(str(tiny_dirs["llama"]), device=device)
    a = engine.chat(conversation(1), max_new_tokens=6, temperature=1.0, seed=7)
    b = engine.chat(conversation(1), max_new_tokens=6, temperature=1.0, seed=7)
    assert a.tokens == b.tokens and len(a.tokens) >= 1


def test_stop_strings_cut_the_text(engines):
    full, _ = engines
    base = full.chat(conversation(1), max_new_tokens=12)
    assert len(base.text) >= 4, "the seeded tiny model must produce some text to cut"
    stop = base.text[2:4]
    cut = full.chat(conversation(1), max_new_tokens=12, stop=[stop])
    assert stop not in cut.text and base.text.startswith(cut.text)
    assert cut.stats.finish_reason == "stop"


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        ({"messages": []}, PromptError),
        ({"messages": [{"role": "robot", "content": "x"}]}, PromptError),
        ({"messages": [{"role": "user", "content": 3}]}, PromptError),
        ({"max_new_tokens": 0}, ConfigError),
        ({"max_new_tokens": 1.5}, ConfigError),
        ({"temperature": -1}, ConfigError),
        ({"top_p": 0}, ConfigError),
        ({"messages": [{"role": "user", "content": "word " * 5000}]}, ContextLengthError),
    ],
)
def test_bad_input_raises_and_leaves_stores_unchanged(engines, kwargs, exc):
    _, prefix = engines
    prefix.chat(conversation(1), max_new_tokens=2)
    before = (prefix.prefix_cache.bytes_used, prefix.segments.bytes_used, len(prefix.calls))
    call = {"messages": conversation(1), "max_new_tokens": 2, **kwargs}
    with pytest.raises(exc):
        prefix.chat(**call)
    assert (prefix.prefix_cache.bytes_used, prefix.segments.bytes_used, len(prefix.calls)) == before


def test_unknown_config_options_are_rejected():
    with pytest.raises(ConfigError, match="unknown mode"):
        EngineConfig(mode="turbo")
    with pytest.raises(ConfigError, match="share_scope"):
        EngineConfig(share_scope="everyone")
    with pytest.raises(ConfigError, match="unknown EngineConfig option"):
        EngineConfig().with_options(colour="red")


def test_sub_configs_take_flat_names_and_check_their_fields(tiny_engine, monkeypatch):
    from dataclasses import fields

    from kvshare.config import AnchorsConfig, KernelsConfig, SelectConfig, StoreConfig

    parts = (StoreConfig, SelectConfig, AnchorsConfig, KernelsConfig)
    names = [f.name for p in parts for f in fields(p)]
    assert len(names) == len(set(names))  # every flat name routes to one sub-config
    top = {f.name for f in fields(EngineConfig)}
    assert not top & set(names)
    c = EngineConfig.of(mode="blend", recompute_ratio=0.3, anchor_gamma=0.5, sink_tokens=2)
    assert (c.mode, c.select.recompute_ratio, c.select.sink_tokens) == ("blend", 0.3, 2)
    assert c.anchors.anchor_gamma == 0.5 and c.store == StoreConfig()
    both = c.with_options(select=SelectConfig(recent_tokens=3), check_layers=(2,))
    assert both.select.recent_tokens == 3 and both.select.check_layers == (2,)
    assert both.select.recompute_ratio == SelectConfig().recompute_ratio  # replaced whole
    for bad in ({"recompute_ratio": 1.5}, {"check_layers": (4, 1)}, {"anchor_storage": "q4"}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            EngineConfig.of(**bad)
    with pytest.raises(ConfigError, match="kernel_backend"):
        EngineConfig.of(kernel_backend="cuda-graphs")
    with pytest.raises(ConfigError, match="StoreConfig"):
        EngineConfig(store={"prefix_cache_bytes": 1})  # type: ignore[arg-type]
    from kvshare.anchors.knn import TorchIndex

    pool = tiny_engine.fork(mode="kvshare", anchor_index="torch").anchor_pool()
    assert pool.index_kind is TorchIndex
    with pytest.raises(ConfigError, match="anchor_index"):
        EngineConfig.of(anchor_index="hnsw")
    monkeypatch.setenv("KVSHARE_KERNELS", "triton")  # an explicit config choice wins
    assert tiny_engine.fork(kernel_backend="torch").kernels.name == "torch"
    assert tiny_engine.fork().kernels.name == "triton"  # auto: the environment (interpreter)


def test_parallel_callers_get_sequential_results(tiny_engine):
    convs = [conversation(t) for t in (1, 2, 3, 1, 2, 3)]
    expected = [tiny_engine.fork(mode="full").chat(c, max_new_tokens=5).tokens for c in convs]
    eng = tiny_engine.fork(mode="prefix")
    results: list[list[int] | None] = [None] * len(convs)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            results[i] = eng.chat(convs[i], agent=f"a{i}", max_new_tokens=5).tokens
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(convs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == expected
    assert len(eng.calls) == len(convs)
    assert eng.prefix_cache.bytes_used <= eng.prefix_cache.budget_bytes


def test_tiny_prefix_hits_are_not_worth_reusing(tiny_engine):
    a = [{"role": "system", "content": "Shared head. " + "alpha " * 60}]
    b = [{"role": "system", "content": "Shared head. " + "beta " * 60}]
    cautious = tiny_engine.fork(mode="prefix")  # default min_reuse_share
    eager = tiny_engine.fork(mode="prefix", min_reuse_share=0.0)
    for eng in (cautious, eager):
        eng.chat(a, max_new_tokens=1)
    assert cautious.chat(b, max_new_tokens=1).stats.prefix_hit_tokens == 0
    hit = eager.chat(b, max_new_tokens=1).stats
    assert 0 < hit.prefix_hit_tokens < 0.15 * hit.prompt_tokens
