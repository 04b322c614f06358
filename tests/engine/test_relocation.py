"""Relocated reuse (blend): exact at the source position, ratio 1.0 == full, run matching."""

from __future__ import annotations

import pytest
import torch
from kvshare.kernels import KV, TorchOps, output_cache

from kvshare.engine.relocate import assemble, find_runs
from kvshare.scope import Scope

from factories import DOC, team

TENANT_SCOPE = Scope("tenant")  # the scope of calls without a tenant id


def test_relocating_into_the_same_context_is_exact(tiny_engine):
    eng = tiny_engine.fork(mode="blend", sink_tokens=0, recompute_ratio=0.0)
    ref = tiny_engine.fork(mode="full").chat(team("critic"), max_new_tokens=6)
    eng.chat(team("critic"), max_new_tokens=6)
    eng.prefix_cache.clear()  # force relocation instead of an exact prefix hit
    r = eng.chat(team("critic"), max_new_tokens=6, shadow=True)
    assert r.stats.relocated_tokens > 0 and r.stats.prefix_hit_tokens == 0
    assert r.stats.kl is not None and r.stats.kl < 1e-8
    assert r.tokens == ref.tokens


def test_shared_text_behind_another_prefix_is_relocated(tiny_engine):
    eng = tiny_engine.fork(mode="blend")
    eng.chat(team("planner"), max_new_tokens=4)
    r = eng.chat(team("critic"), max_new_tokens=4, shadow=True)
    s = r.stats
    assert s.prefix_hit_tokens < 10  # different system prompt: no useful exact prefix
    assert s.relocated_tokens + s.recomputed_tokens >= 0.8 * len(eng.tokenizer(DOC)["input_ids"])
    assert s.prefix_hit_tokens + s.relocated_tokens + s.computed_tokens == s.prompt_tokens
    assert s.recomputed_tokens >= eng.config.select.sink_tokens


def test_blend_with_ratio_one_equals_full(tiny_engine):
    eng = tiny_engine.fork(mode="blend", recompute_ratio=1.0)
    eng.chat(team("planner"), max_new_tokens=4)
    r = eng.chat(team("critic"), max_new_tokens=6, shadow=True)
    ref = tiny_engine.fork(mode="full").chat(team("critic"), max_new_tokens=6)
    assert r.stats.relocated_tokens == 0 and r.stats.recomputed_tokens > 0
    assert r.stats.kl is not None and r.stats.kl < 1e-8 and r.tokens == ref.tokens


def test_assemble_moves_keys_to_their_new_positions(tiny_engine):
    eng = tiny_engine.fork(mode="blend")
    eng.chat(team("planner"), max_new_tokens=2)
    from kvshare.model.prompt import render

    prompt = render(eng.tokenizer, team("critic"))
    runs = find_runs(prompt, 0, TENANT_SCOPE, eng.segments)
    asm = assemble(
        len(prompt), None, runs, eng.adapter.kv_dims, eng.rotary, torch.float32, torch.device("cpu")
    )
    run = max(runs, key=lambda r: r.length)
    with torch.inference_mode():
        out = eng.model(input_ids=torch.tensor([prompt.ids]), use_cache=True)
    exact = KV.from_cache(output_cache(out))
    # layer 0 depends only on token and position: relocated layer-0 KV must be exact
    sl = slice(run.start, run.end)
    assert (asm.cache.keys[0, :, sl] - exact.keys[0, :, sl]).abs().max() < 1e-4
    assert (asm.cache.values[0, :, sl] - exact.values[0, :, sl]).abs().max() < 1e-5
    dev = TorchOps().deviation(
        KV(exact.keys[1:2, :, sl], exact.values[1:2, :, sl]),
        KV(asm.cache.keys[1:2, :, sl], asm.cache.values[1:2, :, sl]),
    )
    assert dev.shape == (run.length,) and float(dev.max()) > 0


@pytest.mark.parametrize(
    "bad",
    [{"check_layers": ()}, {"check_layers": (4, 1)}, {"recompute_ratio": 1.5}, {"sink_tokens": -1}],
)
def test_bad_blend_options(tiny_engine, bad):
    from kvshare.errors import ConfigError

    with pytest.raises(ConfigError):
        tiny_engine.fork(mode="blend", **bad)
