"""Validated anchor offsets: gains fitted against fresh KV at the first check layer."""

from __future__ import annotations

import pytest
import torch
from kvshare.anchors import AnchorPool, Estimate, at_positions
from kvshare.kernels import KV

from kvshare.engine.correct import RunEstimate, ValidatedOffsets, fit_gain
from kvshare.engine.relocate import Run

from conftest import tiny_model


@pytest.mark.parametrize(
    ("scale", "want"), [(1.0, 1.0), (0.5, 0.5), (-1.0, 0.0), (2.0, 1.0), (0.0, 0.0)]
)
def test_fit_gain_is_the_clamped_least_squares_scale(scale, want):
    est = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    assert fit_gain(scale * est, est) == pytest.approx(want, abs=1e-6)
    assert fit_gain(est, torch.zeros_like(est)) == 0.0


def test_validated_offsets_keep_what_holds_up_and_drop_the_rest():
    """The estimate is right for keys and backwards for values: keys get the whole offset at
    every layer above the check, values none; the filter sees the corrected keys."""
    rotary = tiny_model("llama").model.rotary_emb
    layers, heads, dim, n, start, s = 3, 2, 16, 5, 2, 8
    gen = torch.Generator().manual_seed(1)
    delta = torch.randn(layers, 2, heads, n, dim, generator=gen)  # position-free
    inf = torch.zeros(n)
    est = Estimate(delta, inf, inf, inf)
    run = Run(start, start + n, None, 0)  # type: ignore[arg-type]
    e = RunEstimate(run, "a:m1->b:m1", torch.zeros(n, 4), torch.arange(start, start + n), est)
    truth = at_positions(KV(delta[:, 0], delta[:, 1]), e.positions, rotary)  # [L, H, n, D]
    cache = KV(torch.zeros(layers, heads, s, dim), torch.zeros(layers, heads, s, dim))
    sel = torch.arange(s)
    fresh = KV(torch.zeros(1, heads, s, dim), torch.zeros(1, heads, s, dim))
    fresh.keys[0, :, start : start + n] = truth.keys[0]
    fresh.values[0, :, start : start + n] = -truth.values[0]
    seen: dict[str, KV] = {}
    fits: list[tuple[str, float, float]] = []

    def inner(layer, sel_, fresh_, before):
        seen["before"] = before
        return torch.ones(sel_.numel(), dtype=torch.bool)

    check = ValidatedOffsets(inner, [e], cache, rotary, 4.0, 0, lambda *a: fits.append(a))
    before = KV(torch.zeros_like(fresh.keys), torch.zeros_like(fresh.values))
    assert check(0, sel, fresh, before).all()
    assert [(k, float(gk), float(gv)) for k, gk, gv in fits] == [
        ("a:m1->b:m1", pytest.approx(1.0), 0.0)
    ]
    assert torch.allclose(seen["before"].keys, fresh.keys, atol=1e-6)
    assert torch.equal(seen["before"].values, before.values)
    assert torch.allclose(cache.keys[1:, :, start : start + n], truth.keys[1:], atol=1e-6)
    assert torch.equal(cache.values, torch.zeros_like(cache.values))
    assert torch.equal(cache.keys[0], torch.zeros_like(cache.keys[0]))  # the check layer itself
    check(1, sel, fresh, before)  # later checks only narrow
    assert len(fits) == 1


def test_pool_gain_is_a_running_mean_and_survives_save_load(tmp_path):
    pool = AnchorPool()
    assert pool.gain("k") == (1.0, 1.0)
    pool.record_gain("k", 0.0, 1.0)
    assert pool.gain("k") == (0.0, 1.0)
    pool.record_gain("k", 1.0, 1.0, rate=0.5)
    assert pool.gain("k") == (0.5, 1.0)
    pool.save(tmp_path / "pool.kvpool")
    assert AnchorPool.load(tmp_path / "pool.kvpool").gain("k") == (0.5, 1.0)


def test_run_gains_equal_a_fit_per_run():
    from kvshare.engine.correct import fit_gain, run_gains

    g = torch.Generator().manual_seed(3)
    true, est = torch.randn(1, 2, 12, 4, generator=g), torch.randn(1, 2, 12, 4, generator=g)
    est[:, :, 8:10] = 0  # run 2 has no offset on its tokens
    rid = torch.tensor([0, 0, 0, 1, 1, 3, 3, 0, 2, 2, 1, 3])  # 3: in no run
    gains = run_gains(true, est, rid, 3)
    for r in range(2):
        inside = rid == r
        assert float(gains[r]) == pytest.approx(fit_gain(true[:, :, inside], est[:, :, inside]))
    assert torch.isnan(gains[2]) and gains.shape == (3,)
