"""KV primitives against their oracles: full prefill, sequential recompute, direct RoPE."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvshare.kernels import (
    KV,
    cache_kwargs,
    gather,
    gradual_prefill,
    output_cache,
    partial_prefill,
    scatter,
    shift_kv,
    slice_tokens,
    splice,
)

from kvshare.model.adapter import ModelAdapter

from conftest import FAMILIES, tiny_model
from factories import ROPE_VARIANTS

S = 24


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return tiny_model(request.param)


def ids_of(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 49152, (n,), generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def full_prefill(model, ids: torch.Tensor, start: int = 0):
    pos = torch.arange(start, start + ids.numel())
    out = model(input_ids=ids[None], position_ids=pos[None], use_cache=True)
    return KV.from_cache(output_cache(out)), out.logits[0]


def test_all_selected_equals_full_prefill(model):
    ids = ids_of(S)
    kv, logits = full_prefill(model, ids)
    zeros = KV(torch.zeros_like(kv.keys), torch.zeros_like(kv.values))
    for ratio in (0.0, 1.0):  # 0.0: ordinary causal prefill; 1.0: the masked path
        res = partial_prefill(
            model,
            zeros,
            ids,
            torch.arange(S),
            torch.arange(S),
            max_masked_ratio=ratio,
            all_logits=True,
        )
        assert res.masked == (ratio == 1.0)
        assert (res.logits - logits).abs().max() <= 1e-4
        assert (res.kv.keys - kv.keys).abs().max() <= 1e-4
        assert (res.kv.values - kv.values).abs().max() <= 1e-4


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_subset_of_exact_cache_is_a_fixed_point(model, data):
    """Recomputing any subset against an exact cache reproduces that cache."""
    n = data.draw(st.integers(2, S))
    ids = ids_of(n, seed=n)
    kv, _ = full_prefill(model, ids)
    sel = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True))
    res = partial_prefill(model, kv, ids, torch.arange(n), torch.tensor(sel), max_masked_ratio=1.0)
    assert res.masked
    assert (res.kv.keys - kv.keys).abs().max() <= 1e-4
    assert (res.kv.values - kv.values).abs().max() <= 1e-4


@torch.inference_mode()
def sequential_oracle(model, cache: KV, ids, positions, sel: list[int]) -> KV:
    """Recompute the selected tokens one at a time, in position order, with no custom mask."""
    out = cache
    for i in sorted(sel, key=lambda j: int(positions[j])):
        visible = [j for j in range(ids.numel()) if j != i and positions[j] <= positions[i]]
        past = gather(out, torch.tensor(visible, dtype=torch.long)).to_cache()
        res = model(
            input_ids=ids[i].reshape(1, 1),
            position_ids=positions[i].reshape(1, 1),
            use_cache=True,
            **cache_kwargs(model, past),
        )
        new = KV.from_cache(output_cache(res), len(visible))
        out = scatter(out, torch.tensor([i]), new)
    return out


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_subset_of_foreign_cache_matches_sequential_recompute(model, data):
    """Against a perturbed (reused) cache, the masked forward writes the exact recompute KV."""
    n = data.draw(st.integers(3, 16))
    ids = ids_of(n, seed=100 + n)
    kv, _ = full_prefill(model, ids)
    noise = torch.Generator().manual_seed(n)
    foreign = KV(
        kv.keys + 0.3 * torch.randn(kv.keys.shape, generator=noise),
        kv.values + 0.3 * torch.randn(kv.values.shape, generator=noise),
    )
    span_start = data.draw(st.integers(0, 50))
    positions = torch.arange(span_start, span_start + n)
    sel = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True))
    res = partial_prefill(model, foreign, ids, positions, torch.tensor(sel), max_masked_ratio=1.0)
    expect = sequential_oracle(model, foreign, ids, positions, sel)
    assert (res.kv.keys - expect.keys).abs().max() <= 1e-4
    assert (res.kv.values - expect.values).abs().max() <= 1e-4
    untouched = [j for j in range(n) if j not in sel]
    if untouched:
        idx = torch.tensor(untouched)
        assert torch.equal(gather(res.kv, idx).keys, gather(foreign, idx).keys)


def test_selected_token_never_sees_later_tokens(model):
    """Changing a later token's cached KV must not change an earlier recomputed token."""
    ids = ids_of(12)
    kv, _ = full_prefill(model, ids)
    sel = torch.tensor([2, 5])
    a = partial_prefill(model, kv, ids, torch.arange(12), sel, max_masked_ratio=1.0)
    bumped = KV(kv.keys.clone(), kv.values.clone())
    bumped.keys[:, :, 8:] += 5.0
    bumped.values[:, :, 8:] += 5.0
    b = partial_prefill(model, bumped, ids, torch.arange(12), sel, max_masked_ratio=1.0)
    assert torch.allclose(gather(a.kv, sel).keys, gather(b.kv, sel).keys, atol=1e-6)
    assert torch.allclose(gather(a.kv, sel).values, gather(b.kv, sel).values, atol=1e-6)


def test_fallback_recomputes_tail_exactly(model):
    ids = ids_of(S)
    kv, logits = full_prefill(model, ids)
    stale = scatter(
        kv,
        torch.arange(10, S),
        KV(
            torch.zeros(*kv.keys.shape[:2], S - 10, kv.keys.shape[3]),
            torch.zeros(*kv.keys.shape[:2], S - 10, kv.keys.shape[3]),
        ),
    )
    res = partial_prefill(model, stale, ids, torch.arange(S), torch.arange(10, S))
    assert not res.masked and res.recomputed.tolist() == list(range(10, S))
    assert (res.kv.keys - kv.keys).abs().max() <= 1e-4
    assert (res.logits[-1] - logits[-1]).abs().max() <= 1e-4


@pytest.mark.parametrize("rope", ROPE_VARIANTS)
@pytest.mark.parametrize("delta", [1, 100, 3000])
def test_shift_rope_equals_computing_at_new_position(rope, delta):
    """Layer 0 depends only on token and position, so relocation is exact there."""
    overrides = {} if rope is None else {"rope_parameters": {"rope_theta": 10000.0, **rope}}
    model = tiny_model("llama", **overrides)
    ids = ids_of(16)
    at0, _ = full_prefill(model, ids, start=0)
    at_d, _ = full_prefill(model, ids, start=delta)
    moved = shift_kv(at0, delta, model.model.rotary_emb)
    err = (moved.keys[0] - at_d.keys[0]).abs().max() / at_d.keys[0].abs().max()
    assert err <= 2e-6 + delta * 1e-8  # fp32 angle rounding grows with |position|
    assert torch.equal(moved.values, at0.values)
    back = shift_kv(moved, -delta, model.model.rotary_emb)
    assert (back.keys - at0.keys).abs().max() <= 1e-4


def test_gather_scatter_splice_roundtrip():
    kv = KV(torch.randn(2, 3, 10, 4), torch.randn(2, 3, 10, 4))
    idx = torch.tensor([1, 4, 7])
    part = gather(kv, idx)
    assert part.length == 3 and torch.equal(part.keys[:, :, 1], kv.keys[:, :, 4])
    zeroed = scatter(kv, idx, KV(torch.zeros_like(part.keys), torch.zeros_like(part.values)))
    assert zeroed.keys[:, :, idx].abs().sum() == 0 and torch.equal(
        zeroed.keys[:, :, 0], kv.keys[:, :, 0]
    )
    assert torch.equal(scatter(zeroed, idx, part).keys, kv.keys)
    whole = splice([slice_tokens(kv, 0, 4), slice_tokens(kv, 4, 10)])
    assert torch.equal(whole.keys, kv.keys) and torch.equal(whole.values, kv.values)
    with pytest.raises(ValueError):
        scatter(kv, idx, slice_tokens(kv, 0, 2))


def test_partial_prefill_rejects_bad_input():
    model = tiny_model("llama")
    kv = KV(torch.zeros(2, 2, 4, 16), torch.zeros(2, 2, 4, 16))
    with pytest.raises(ValueError, match="same S tokens"):
        partial_prefill(model, kv, ids_of(5), torch.arange(5), torch.tensor([0]))
    with pytest.raises(ValueError, match="out of range"):
        partial_prefill(model, kv, ids_of(4), torch.arange(4), torch.tensor([4]))
    with pytest.raises(ValueError, match="nothing selected"):
        partial_prefill(model, kv, ids_of(4), torch.arange(4), torch.tensor([], dtype=torch.long))


def test_masked_path_copies_unless_inplace(model):
    """The masked path leaves the caller's cache alone, or writes into it with inplace=True."""
    ids = ids_of(S)
    kv, _ = full_prefill(model, ids)
    stale = KV(kv.keys + 1.0, kv.values + 1.0)
    before = stale.keys.clone()
    sel = torch.tensor([3, 7, S - 1])
    copy = partial_prefill(model, stale, ids, torch.arange(S), sel, max_masked_ratio=1.0)
    assert torch.equal(stale.keys, before) and copy.kv.keys.data_ptr() != stale.keys.data_ptr()
    own = partial_prefill(
        model, stale, ids, torch.arange(S), sel, max_masked_ratio=1.0, inplace=True
    )
    assert own.kv.keys.data_ptr() == stale.keys.data_ptr()
    assert torch.equal(own.kv.keys, copy.kv.keys) and torch.equal(own.kv.values, copy.kv.values)
    untouched = torch.ones(S, dtype=torch.bool)
    untouched[sel] = False
    assert torch.equal(own.kv.keys[:, :, untouched], before[:, :, untouched])


def _keep_all(layer, sel, fresh, before):
    return torch.ones(sel.numel(), dtype=torch.bool)


def narrowed(model, stale: KV, sel, checks, narrow, **options):
    """A gradual prefill of ``sel`` over a copy of ``stale`` (ids and positions 0..S-1)."""
    ids, pos = ids_of(S), torch.arange(S)
    cache = KV(stale.keys.clone(), stale.values.clone())
    return gradual_prefill(ModelAdapter(model), cache, ids, pos, sel, checks, narrow, **options)


KEPT = torch.tensor([5, 9, 12, S - 1])


def _keep_some(layer, s, fresh, before):
    return torch.isin(s, KEPT)


def _stale(model) -> KV:
    kv, _ = full_prefill(model, ids_of(S))
    return KV(kv.keys * 0.9 + 0.1, kv.values * 1.1 - 0.1)


def test_gradual_prefill_without_narrowing_equals_full_prefill(model):
    ids = ids_of(S)
    kv, logits = full_prefill(model, ids)
    zeros = KV(torch.zeros_like(kv.keys), torch.zeros_like(kv.values))
    pos = torch.arange(S)
    res = gradual_prefill(ModelAdapter(model), zeros, ids, pos, pos, (0,), _keep_all)
    assert torch.equal(res.recomputed, pos)
    assert (res.logits[-1] - logits[-1]).abs().max() <= 1e-4
    assert (res.kv.keys - kv.keys).abs().max() <= 1e-4
    assert (res.kv.values - kv.values).abs().max() <= 1e-4


def test_gradual_prefill_dropped_tokens_keep_fresh_kv_below_the_check(model):
    """Dropped after layer c: layers <= c as a partial prefill of the whole set, stale above."""
    ids, pos = ids_of(S), torch.arange(S)
    kv, _ = full_prefill(model, ids)
    stale = KV(kv.keys + 0.5, kv.values - 0.5)
    sel = torch.arange(8, S)
    seen: list[int] = []

    def only_last(layer, s, fresh, before):
        seen.append(layer)
        assert (
            fresh.keys.shape
            == before.keys.shape
            == (1, kv.keys.shape[1], s.numel(), kv.keys.shape[3])
        )
        return torch.zeros(s.numel(), dtype=torch.bool)  # the kernel keeps the last token

    c = 0
    ref = partial_prefill(model, stale, ids, pos, sel, max_masked_ratio=1.0)
    res = narrowed(model, stale, sel, (c,), only_last)
    assert seen == [c] and res.recomputed.tolist() == [S - 1]
    dropped = sel[:-1]
    for got, want, old in (
        (res.kv.keys, ref.kv.keys, stale.keys),
        (res.kv.values, ref.kv.values, stale.values),
    ):
        assert (got[: c + 1, :, dropped] - want[: c + 1, :, dropped]).abs().max() <= 1e-5
        assert torch.equal(got[c + 1 :, :, dropped], old[c + 1 :, :, dropped])
        assert torch.equal(got[:, :, :8], old[:, :, :8])


def test_gradual_prefill_kept_tokens_equal_partial_prefill_over_fresh_lower_layers(model):
    """Narrowed inside check layer 0: the kept tokens are computed as a partial prefill of
    themselves over a cache whose layer-0 KV of the whole set is fresh (and stale above)."""
    ids, pos = ids_of(S), torch.arange(S)
    stale, sel, kept = _stale(model), torch.arange(4, S), KEPT
    res = narrowed(model, stale, sel, (0,), _keep_some)
    assert torch.equal(res.recomputed, kept)
    lower = partial_prefill(model, stale, ids, pos, sel, max_masked_ratio=1.0)
    mixed = KV(stale.keys.clone(), stale.values.clone())
    mixed.keys[0], mixed.values[0] = lower.kv.keys[0], lower.kv.values[0]
    ref = partial_prefill(model, mixed, ids, pos, kept, max_masked_ratio=1.0)
    assert (res.logits[-1] - ref.logits[-1]).abs().max() <= 1e-4
    assert (res.kv.keys - ref.kv.keys).abs().max() <= 1e-5
    assert (res.kv.values - ref.kv.values).abs().max() <= 1e-5
    assert not torch.allclose(res.kv.keys[1:, :, kept], stale.keys[1:, :, kept])


@pytest.mark.parametrize(
    ("family", "attn"), [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa")]
)
def test_growing_cache_decodes_like_a_dynamic_cache(family, attn):
    """Greedy decode over the preallocated cache (no mask passed: transformers' mask builder
    asks the cache for its sizes) equals transformers' own cache, token for token, under
    either attention, and its KV equals the one a DynamicCache accumulates."""
    from kvshare.kernels import GrowingCache

    from kvshare.engine.decode import SamplingParams, decode

    model = tiny_model(family)
    model.config._attn_implementation = attn
    ids = torch.randint(3, 1000, (1, 20))
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)
        ref = model.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    prompt_kv = KV.from_cache(output_cache(out))
    first = int(out.logits[0, -1].argmax())
    res = decode(
        model, prompt_kv, first, 8, params=SamplingParams(), eos_ids=set(), context_length=4096
    )
    assert res.tokens == ref[0, 20:].tolist()
    assert res.kv.length == 27 and res.kv.keys.is_contiguous()
    with pytest.raises(ValueError, match="capacity"):
        GrowingCache(prompt_kv, 5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_masked_prefill_is_exact_under_each_attention(attn):
    """SDPA gets a bool mask, eager attention an additive one; both give the full prefill."""
    model = tiny_model("llama")
    model.config._attn_implementation = attn
    ids = ids_of(S)
    kv, logits = full_prefill(model, ids)
    zeros = KV(torch.zeros_like(kv.keys), torch.zeros_like(kv.values))
    res = partial_prefill(model, zeros, ids, torch.arange(S), torch.arange(S), max_masked_ratio=1.0)
    assert res.masked
    assert (res.logits[-1] - logits[-1]).abs().max() <= 1e-4
    assert (res.kv.values - kv.values).abs().max() <= 1e-4


def test_compact_finds_the_kept_tokens_at_a_known_size():
    """With the count known, a stable sort gives nonzero's ascending indices (no read)."""
    from kvshare.kernels import compact

    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        keep = torch.rand(50, generator=g) < 0.3
        want = keep.nonzero().flatten()
        assert torch.equal(compact(keep, want.numel()), want)
        assert torch.equal(compact(keep, None), want)


def test_a_fixed_shape_gradual_prefill_writes_what_the_compacting_one_does(model):
    """Carrying the set on at full size (only the kept tokens writing) gives the compacting
    prefill's KV and logits; ``live`` marks the tokens that were recomputed. With the kept
    count known on the host, the compaction itself reads nothing and keeps the same set."""
    stale, sel = _stale(model), torch.arange(4, S)
    compacted = narrowed(model, stale, sel, (0,), _keep_some)
    fixed = narrowed(model, stale, sel, (0,), _keep_some, fixed_shapes=True)
    assert torch.equal(fixed.recomputed, sel) and fixed.live is not None
    assert torch.equal(fixed.recomputed[fixed.live], compacted.recomputed)
    assert (fixed.logits[-1] - compacted.logits[-1]).abs().max() <= 1e-4
    assert (fixed.kv.keys - compacted.kv.keys).abs().max() <= 1e-5
    assert (fixed.kv.values - compacted.kv.values).abs().max() <= 1e-5
    known = narrowed(model, stale, sel, (0,), _keep_some, sizes=lambda layer, n: KEPT.numel())
    assert torch.equal(known.recomputed, compacted.recomputed) and known.live is None
    assert torch.equal(known.kv.keys, compacted.kv.keys)


def test_a_carried_set_narrowed_again_writes_what_the_compacting_one_does():
    """Carried on at full size from check layer 0, then narrowed again at layer 1: tokens
    dropped at 0 keep their cached KV at 1 (they no longer write), as when compacted."""
    deep = tiny_model("llama", num_hidden_layers=4)
    stale, sel = _stale(deep), torch.arange(4, S)
    second = torch.tensor([9, S - 1])

    def twice(layer, s, fresh, before):
        return torch.isin(s, KEPT if layer == 0 else second)

    compacted = narrowed(deep, stale, sel, (0, 1), twice)
    fixed = narrowed(deep, stale, sel, (0, 1), twice, fixed_shapes=True)
    assert torch.equal(compacted.recomputed, second)
    assert fixed.live is not None and torch.equal(fixed.recomputed[fixed.live], second)
    assert (fixed.logits[-1] - compacted.logits[-1]).abs().max() <= 1e-4
    assert (fixed.kv.keys - compacted.kv.keys).abs().max() <= 1e-5
    assert (fixed.kv.values - compacted.kv.values).abs().max() <= 1e-5
