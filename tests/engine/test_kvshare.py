"""Modes anchor and kvshare on a tiny model: learned offsets, recompute, adaptation."""

from __future__ import annotations

import pytest

from kvshare.errors import ConfigError
from kvshare.scope import Scope

from factories import team

TENANT_SCOPE = Scope("tenant")  # the scope of calls without a tenant id


def test_kvshare_with_ratio_one_equals_full(tiny_engine):
    eng = tiny_engine.fork(mode="kvshare", recompute_ratio=1.0, adaptive=False)
    eng.chat(team("planner"), agent="planner", max_new_tokens=4)
    r = eng.chat(team("critic"), agent="critic", max_new_tokens=6, shadow=True, teach=True)
    ref = tiny_engine.fork(mode="full").chat(team("critic"), max_new_tokens=6)
    assert r.stats.relocated_tokens == 0 and r.stats.recomputed_tokens > 0
    assert r.stats.kl is not None and r.stats.kl < 1e-8 and r.tokens == ref.tokens


def _learned_then_reused(engine, mode: str, recompute_ratio: float = 0.0, **options):
    """planner reads DOC; critic reads it (a full prefill teaches Δ); critic again reuses it from a
    fresh planner trace (its own trace, which would be a closer source, is dropped)."""
    eng = engine.fork(
        mode=mode,
        recompute_ratio=recompute_ratio,
        sink_tokens=0,
        recent_tokens=0,
        adaptive=False,
        neighbours=1,
        anchor_storage="float32",
        **options,
    )
    eng.chat(team("planner"), agent="planner", max_new_tokens=3)
    first = eng.chat(team("critic"), agent="critic", max_new_tokens=3, shadow=True, teach=True)
    eng.prefix_cache.clear()
    eng.segments.clear()
    eng.chat(team("planner"), agent="planner", max_new_tokens=3)
    again = eng.chat(team("critic"), agent="critic", max_new_tokens=3, shadow=True, teach=True)
    return eng, first, again


def test_a_learned_offset_restores_the_full_prefill_kv(tiny_engine):
    eng, first, again = _learned_then_reused(tiny_engine, "kvshare")
    assert first.stats.relocated_tokens > 0 and first.stats.kl is not None
    assert len(eng.anchor_pool()) >= first.stats.relocated_tokens
    s = again.stats
    assert s.relocated_tokens >= first.stats.relocated_tokens and s.recomputed_tokens == 0
    assert s.kl is not None and s.kl < 1e-9 < first.stats.kl
    assert s.greedy_match == 32


def test_anchor_mode_falls_back_to_dense_prefill_without_anchors(tiny_engine):
    eng, first, again = _learned_then_reused(tiny_engine, "anchor")
    assert first.stats.relocated_tokens == 0 and first.stats.kl is not None
    assert first.stats.kl < 1e-8  # nothing known: KVCOMM's rule prefills densely
    # the dense prefill taught the pool; runs whose key has anchors are reused next time
    assert len(eng.anchor_pool()) > 0


def test_kvshare_adapts_its_ratio_toward_the_target(tiny_engine):
    eng = tiny_engine.fork(mode="kvshare", target_kl=1e-12, recompute_ratio=0.1)
    eng.chat(team("planner"), agent="planner", max_new_tokens=2)
    r = eng.chat(team("critic"), agent="critic", max_new_tokens=2, shadow=True, teach=True)
    assert r.stats.kl is not None and r.stats.kl > 1e-12
    assert eng.recompute_ratio() > 0.1  # too much error: recompute more next time
    loose = tiny_engine.fork(mode="kvshare", target_kl=10.0, recompute_ratio=0.1)
    loose.chat(team("planner"), agent="planner", max_new_tokens=2)
    loose.chat(team("critic"), agent="critic", max_new_tokens=2, shadow=True, teach=True)
    assert loose.recompute_ratio() < 0.1
    loose.reset()
    assert loose.recompute_ratio() == 0.1 and len(loose.anchor_pool()) == 0


def test_kvshare_recomputes_sinks_plus_its_ratio(tiny_engine):
    eng = tiny_engine.fork(
        mode="kvshare",
        adaptive=False,
        recompute_ratio=0.2,
        deviation_threshold=None,
        recent_tokens=0,
    )
    eng.chat(team("planner"), agent="planner", max_new_tokens=2)
    from kvshare.model.prompt import render

    prompt = render(eng.tokenizer, team("critic"))
    asm = eng.plan(TENANT_SCOPE, prompt)
    s = eng.chat(team("critic"), agent="critic", max_new_tokens=2).stats
    reusable = int(asm.relocated.sum())
    sinks = sum(min(eng.config.select.sink_tokens, r.length) for r in asm.runs)
    assert asm.runs and s.relocated_tokens + s.recomputed_tokens == reusable
    assert s.recomputed_tokens == sinks + round(0.2 * reusable)
    assert s.prefix_hit_tokens + s.relocated_tokens + s.computed_tokens == s.prompt_tokens


def test_uncertainty_order_puts_unknown_contexts_and_later_tokens_first():
    import torch
    from kvshare.anchors import Estimate

    from kvshare.engine.correct import RunEstimate
    from kvshare.engine.select import uncertainty_order

    def est(pos: list[int], dist: list[float]) -> RunEstimate:
        n = len(pos)
        e = Estimate(torch.zeros(1), torch.tensor(dist), torch.zeros(n), torch.zeros(n))
        return RunEstimate(None, "k", torch.zeros(n, 2), torch.tensor(pos), e)  # type: ignore[arg-type]

    order = uncertainty_order([est([3, 4, 5], [0.1, 2.0, 0.5]), est([9, 10], [float("inf")] * 2)])
    assert order.tolist() == [10, 9, 4, 5, 3]


@pytest.fixture(scope="module")
def deep_engine(tmp_path_factory, tokenizer):
    """A 4-layer tiny Llama: check layer 1 sees real deviation (layer 0's is exactly zero)."""
    from kvshare import Engine, EngineConfig

    from conftest import tiny_model

    path = tmp_path_factory.mktemp("tiny-deep")
    tiny_model("llama", num_hidden_layers=4).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return Engine.from_pretrained(str(path), config=EngineConfig.of(check_layers=(1,)))


def test_deviation_threshold_grows_the_budget_where_kv_is_wrong(deep_engine):
    def recomputed(threshold: float | None) -> int:
        eng = deep_engine.fork(
            mode="kvshare", adaptive=False, recompute_ratio=0.05, deviation_threshold=threshold
        )
        eng.chat(team("planner"), agent="planner", max_new_tokens=2)
        return eng.chat(team("critic"), agent="critic", max_new_tokens=2).stats.recomputed_tokens

    assert recomputed(0.0) > recomputed(None) == recomputed(1e9)
    with pytest.raises(ConfigError):
        deep_engine.fork(mode="kvshare", deviation_threshold=-1.0)


def test_recent_tokens_are_always_recomputed(tiny_engine):
    import torch

    from kvshare.engine.select import forced_runs
    from kvshare.model.prompt import render

    eng = tiny_engine.fork(mode="kvshare", adaptive=False, recompute_ratio=0.0, recent_tokens=8)
    eng.chat(team("planner"), agent="planner", max_new_tokens=2)
    asm = eng.plan(TENANT_SCOPE, render(eng.tokenizer, team("critic")))
    mask = torch.from_numpy(forced_runs(asm, 0, 8))
    last = asm.relocated.nonzero().flatten()[-8:]
    assert int(mask.sum()) == 8 and mask[last].all()
    s = eng.chat(team("critic"), agent="critic", max_new_tokens=2).stats
    sinks = sum(min(eng.config.select.sink_tokens, r.length) for r in asm.runs)
    assert sinks < s.recomputed_tokens <= sinks + 8


def test_offsets_that_hold_up_at_the_check_layer_are_kept(deep_engine):
    """A Δ learned in the same contexts is right: the fitted gains are ~1 and the reused
    call is close to the full prefill (recomputing only a tenth of its tokens)."""
    eng, first, again = _learned_then_reused(
        deep_engine, "kvshare", recompute_ratio=0.1, deviation_threshold=None
    )
    (key,) = eng.anchor_pool().context_keys()
    gk, gv = eng.anchor_pool().gain(key)
    assert gk > 0.95 and gv > 0.95
    assert again.stats.relocated_tokens > 0 and again.stats.kl is not None
    assert first.stats.kl is not None and again.stats.kl < 1e-3 * first.stats.kl
