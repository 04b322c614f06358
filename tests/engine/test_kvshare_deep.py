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
    """planner reads DOC; critic reads it (a shadow teaches Δ); critic again reuses it from a
    fresh planner trace."""
    eng = engine.fork(mode="kvshare", sink_tokens=0, recent_tokens=0, adaptive=False, neighbours=1)
    eng.chat(team("planner"), agent="planner", max_new_tokens=3)
    first = eng.chat(team("critic"), agent="critic", max_new_tokens=3, shadow=True)
    assert first.stats.relocated_tokens > 0 and len(eng.anchor_pool()) > 0
    eng.prefix_cache.clear()
    eng.segments.clear()
    eng.chat(team("planner"), agent="planner", max_new_tokens=3)
    again = eng.chat(team("critic"), agent="critic", max_new_tokens=3, shadow=True)
    assert again.stats.relocated_tokens > 0 and again.stats.kl is not None
    return eng


def test_the_default_check_layers_fit_gains_on_a_deep_model(deep_engine, tiny_engine):
    """Offsets learned from a shadowed call are checked at layer 1 on the next reuse: a gain
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
    g = torch.Generator().manual_seed(seed)
    s = 40
    forced = torch.rand(s, generator=g) < 0.3
    protect = (torch.rand(s, generator=g) < 0.1) & ~forced
    sel = torch.arange(s)[torch.rand(s, generator=g) < 0.8]
    sel = torch.unique(torch.cat([sel, forced.nonzero().flatten()]))  # forced are always in
    fresh, before = _kv((torch.rand(sel.numel(), generator=g) * 2).tolist())
    n_forced = int(forced.sum())
    for threshold in (None, 0.8):
        for layer in (1, 4):
            args = (forced, protect, 3, 6, 4, threshold)
            new = DeviationFilter(*args, n_forced=n_forced)(layer, sel, fresh, before)
            counted = DeviationFilter(*args)(layer, sel, fresh, before)
            old = _old_rule(DeviationFilter(*args), layer, sel, fresh, before)
            assert torch.equal(new, old) and torch.equal(counted, old)
