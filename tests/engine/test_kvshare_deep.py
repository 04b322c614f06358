"""kvshare mode where its check layers are real: a 6-layer tiny model keeps the default check
layers (1, 4), so offsets are checked against fresh KV at layer 1 (gains fitted and recorded)
and the anchors' uncertainty shortlist rides to the last check. The 2-layer model clamps the
check layers to (0,), where relocated KV is exact and neither runs."""

from __future__ import annotations

import pytest
import torch
from kvshare.kernels import KV

from kvshare import Engine, EngineConfig
from kvshare.engine.select import DeviationFilter

from conftest import tiny_model
from factories import team

LAYERS = 6


@pytest.fixture(scope="module")
def deep_engine(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Engine:
    path = tmp_path_factory.mktemp("tiny-deep")
    tiny_model("llama", num_hidden_layers=LAYERS).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return Engine.from_pretrained(str(path), config=EngineConfig(mode="kvshare"))


def _learn_then_reuse(engine: Engine) -> Engine:
    """planner reads DOC; critic reads it (a full prefill teaches Δ); critic again reuses it from a
    fresh planner trace."""
    eng = engine.fork(mode="kvshare", sink_tokens=0, recent_tokens=0, adaptive=False, neighbours=1)
    eng.chat(team("planner"), agent="planner", max_new_tokens=3)
    first = eng.chat(team("critic"), agent="critic", max_new_tokens=3, shadow=True, teach=True)
    assert first.stats.relocated_tokens > 0 and len(eng.anchor_pool()) > 0
    eng.prefix_cache.clear()
    eng.segments.clear()
    eng.chat(team("planner"), agent="planner", max_new_tokens=3)
    again = eng.chat(team("critic"), agent="critic", max_new_tokens=3, shadow=True, teach=True)
    assert again.stats.relocated_tokens > 0 and again.stats.kl is not None
    return eng


def test_the_default_check_layers_fit_gains_on_a_deep_model(deep_engine, tiny_engine):
    """Offsets taught by a full prefill are checked at layer 1 on the next reuse: a gain
    in [0, 1] is fitted and recorded for the key it used. The 2-layer model, whose check
    layers clamp to (0,), records none: its offsets are scaled by gains never checked."""
    assert deep_engine.config.select.check_layers == (1, 4) and LAYERS - 2 >= 4
    gains = _learn_then_reuse(deep_engine).anchor_pool().gains()
    assert gains and all(0.0 <= g <= 1.0 for pair in gains.values() for g in pair)
    assert _learn_then_reuse(tiny_engine).anchor_pool().gains() == {}


def _kv(dev: list[float]) -> tuple[KV, KV]:
    """Fresh and reused KV of one layer whose per-token deviation grows with ``dev``."""
    n = len(dev)
    before = KV(torch.ones(1, 1, n, 4), torch.ones(1, 1, n, 4))
    scale = torch.tensor(dev).view(1, 1, n, 1)
    return KV(before.keys + scale, before.values + scale), before


def test_the_uncertainty_shortlist_rides_to_the_last_check_layer():
    """At check layer 1 a protected (most uncertain) token is kept however small its deviation;
    at the last check layer (4) only forced tokens and the largest deviations are."""
    forced = torch.tensor([False, False, False, False, True])
    protect = torch.tensor([True, False, False, False, False])
    narrow = DeviationFilter(forced, protect, budget=1, wide=1, last_layer=4)
    sel = torch.arange(5)
    fresh, before = _kv([0.0, 0.5, 3.0, 0.1, 0.0])
    at_first = narrow(1, sel, fresh, before)
    assert at_first.tolist() == [True, False, True, False, True]  # protected, top-1, forced
    at_last = narrow(4, sel, fresh, before)
    assert at_last.tolist() == [False, False, True, False, True]  # no shortlist at the last


def _old_rule(f: DeviationFilter, layer: int, sel: torch.Tensor, fresh: KV, before: KV):
    """The filter as it was, with its two device reads: the candidates' indices and, at the
    last layer with a threshold, their count above it."""
    last = layer >= f.last_layer
    keep = f.forced[sel].clone()
    cand = (~keep).nonzero().flatten()
    if not last:
        keep |= f.protect[sel]
    if cand.numel() == 0:
        return keep
    n = f.budget if last else f.wide
    dev = f.ops.deviation(fresh, before, cand)
    if last and f.threshold is not None:
        n = max(n, int((dev > f.threshold).sum()))
    keep[cand[dev.topk(min(n, cand.numel())).indices]] = True
    return keep


@pytest.mark.parametrize("seed", range(12))
def test_the_fixed_size_filter_keeps_what_the_old_rule_kept(seed):
    """At the last check layer the read-free filter keeps exactly what the old rule kept
    (the threshold's ``max(budget, count above)`` largest are the budget's top-k plus every
    score above it). Below it, protected tokens no longer take a place among the ``wide``
    (so the count is known on the host): a superset of the old set, its size what ``kept``
    says without reading anything."""
    g = torch.Generator().manual_seed(seed)
    s = 40
    forced = torch.rand(s, generator=g) < 0.3
    protect = (torch.rand(s, generator=g) < 0.1) & ~forced
    sel = torch.arange(s)[torch.rand(s, generator=g) < 0.8]
    sel = torch.unique(torch.cat([sel, forced.nonzero().flatten(), protect.nonzero().flatten()]))
    dev = torch.rand(sel.numel(), generator=g) * 2
    fresh, before = _kv(dev.tolist())
    n_forced, n_protect = int(forced.sum()), int(protect.sum())
    shielded = forced[sel] | protect[sel]
    for threshold in (None, 0.8):
        for layer in (1, 4):
            args = (forced, protect, 3, 6, 4, threshold)
            known = DeviationFilter(*args, n_forced=n_forced, n_protect=n_protect)
            new = known(layer, sel, fresh, before)
            counted = DeviationFilter(*args)(layer, sel, fresh, before)
            old = _old_rule(DeviationFilter(*args), layer, sel, fresh, before)
            assert torch.equal(new, counted)
            if layer == 4:
                assert torch.equal(new, old)
            else:
                assert bool((new | ~old).all()) and bool((new | ~shielded).all())  # ⊇ both
                chosen, passed = new & ~shielded, ~new & ~shielded
                want = min(6, int((~shielded).sum()))  # wide = 6
                assert int(chosen.sum()) == want
                if passed.any():  # the top ``wide`` of the unshielded by deviation
                    assert float(dev[chosen].min()) >= float(dev[passed].max())
            size = known.kept(layer, sel.numel())
            if layer == 4 and threshold is not None:
                assert size is None  # the threshold's count depends on the data
            else:
                assert size == int(new.sum())


def _reuse_counting(engine: Engine, **options: object) -> tuple[object, int]:
    """``_learn_then_reuse``'s last call again under ``options``, its host reads counted."""
    from kvshare.bench.host_reads import before_first_token, count_host_reads

    eng = _learn_then_reuse(engine.fork(**options))
    eng.prefix_cache.clear()
    eng.segments.clear()
    eng.chat(team("planner"), agent="planner", max_new_tokens=3)
    with count_host_reads() as counts:
        r = eng.chat(team("critic"), agent="critic", max_new_tokens=3)
    return r, before_first_token(counts)


def test_a_fixed_shape_kvshare_call_reads_the_host_once(deep_engine):
    """With fixed shapes and the device-side k-NN (what a GPU runs) a ``kvshare`` call with
    relocated runs, anchor offsets, gains and a deviation threshold reads the host exactly
    once before its first token: the sampled token. The compacting path (the CPU default,
    where a read costs nothing) reads more and computes the same reply."""
    fixed, reads = _reuse_counting(deep_engine, fixed_shapes="on", anchor_index="torch")
    assert fixed.stats.relocated_tokens > 0 and fixed.stats.recomputed_tokens > 0
    assert reads == 1
    compacted, more = _reuse_counting(deep_engine, fixed_shapes="off", anchor_index="torch")
    assert more > 1
    assert fixed.tokens == compacted.tokens
    assert fixed.stats.recomputed_tokens == compacted.stats.recomputed_tokens


def test_production_calls_steer_the_ratio_within_bounds(deep_engine):
    """Without a reference prefill, the ratio follows the share of relocated tokens whose
    deviation exceeded the threshold at the last check layer (layer 4 here; at layer 0
    relocated KV is exact): a threshold nothing exceeds walks it down (by at most x0.85 a
    call, never below 0.01), one everything exceeds walks it up toward the cap;
    ``adaptive=False`` leaves it alone."""
    from kvshare.engine.fidelity import steer_ratio

    assert steer_ratio(0.15, 0.0, 0.5) == pytest.approx(0.15 * 0.85)
    assert 0.4 < steer_ratio(0.4, 1.0, 0.5) <= 0.5 and steer_ratio(0.01, 0.0, 0.5) == 0.01

    def run(**options: object) -> float:
        eng = deep_engine.fork(mode="kvshare", recompute_ratio=0.15, **options)
        for role in ("planner", "critic", "judge", "critic"):
            eng.chat(team(role), agent=role, max_new_tokens=2)
        return eng.recompute_ratio()

    assert 0.01 <= run(deviation_threshold=1e9) < 0.15
    assert 0.15 < run(deviation_threshold=0.0, max_recompute_ratio=0.5) <= 0.5
    assert run(deviation_threshold=0.0, adaptive=False) == 0.15
