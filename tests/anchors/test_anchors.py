"""AnchorPool: recall, merging, budget and eviction, storage dtypes, persistence, features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kvshare.anchors import (
    AnchorConfig,
    AnchorPool,
    ModelIdentity,
    at_positions,
    position_free,
    token_features,
)
from kvshare.kernels import KV

from kvshare.errors import ConfigError

from conftest import DEVICES

SHAPE = (3, 2, 2, 8)  # L, 2, H, D


def unit(n: int, f: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, f, generator=g)
    return x / x.norm(dim=1, keepdim=True)


def deltas(n: int, seed: int = 1) -> torch.Tensor:
    """[L, 2, H, n, D] random deviations."""
    g = torch.Generator().manual_seed(seed)
    layers, two, heads, dim = SHAPE
    return torch.randn(layers, two, heads, n, dim, generator=g)


def test_estimate_recalls_a_stored_anchor_exactly():
    pool = AnchorPool(AnchorConfig(neighbours=1, storage="float32"))
    f, d = unit(10), deltas(10)
    assert pool.add("a->b", f, d) == 10
    est = pool.estimate("a->b", f[3:5], SHAPE)
    assert torch.allclose(est.delta, d[:, :, :, 3:5], atol=1e-6)
    assert torch.all(est.distance < 1e-5) and torch.all(est.entropy < 1e-6)


def test_unknown_key_gives_no_offset_and_infinite_uncertainty():
    est = AnchorPool().estimate("nobody->x", unit(4), SHAPE)
    assert est.delta.shape == (3, 2, 2, 4, 8) and not est.delta.any()
    assert torch.isinf(est.distance).all() and torch.isinf(est.entropy).all()


def test_estimate_is_a_softmax_weighted_mean_with_calibrated_tau():
    pool = AnchorPool(AnchorConfig(neighbours=3, storage="float32"))
    f, d = unit(20), deltas(20)
    pool.add("k", f, d)
    q = unit(2, seed=7)
    est = pool.estimate("k", q, SHAPE)
    dist = torch.cdist(q, f).pow(2)  # squared L2, as faiss IndexFlatL2
    nn_d = torch.cdist(f, f).pow(2) + torch.eye(20) * 1e9
    tau = float(nn_d.min(1).values.median())
    top = dist.topk(3, largest=False)
    w = torch.softmax(-top.values / tau, dim=1)
    for i in range(2):
        want = sum(w[i, j] * d[:, :, :, int(top.indices[i, j])] for j in range(3))
        assert torch.allclose(est.delta[:, :, :, i], want, atol=1e-4)
    assert est.entropy.min() > 0 and est.spread.min() >= 0


def test_near_duplicates_merge_into_a_running_mean():
    pool = AnchorPool(AnchorConfig(neighbours=1, storage="float32", merge_distance=1e-3))
    f = unit(1)
    d1, d2 = deltas(1, seed=1), deltas(1, seed=2)
    pool.add("k", f, d1)
    assert pool.add("k", f + 1e-4, d2) == 0 and pool.size("k") == 1
    est = pool.estimate("k", f, SHAPE)
    assert torch.allclose(est.delta, (d1 + d2) / 2, atol=1e-6)
    # a different key never merges
    assert pool.add("other", f, d2) == 1 and len(pool) == 2


def test_byte_budget_holds_and_evicts_the_least_useful_first():
    probe = AnchorPool(AnchorConfig(storage="float32"))
    probe.add("k", unit(1), deltas(1))
    per_anchor = probe.bytes_used
    pool = AnchorPool(AnchorConfig(neighbours=1, storage="float32", budget_bytes=10 * per_anchor))
    f = unit(30)
    pool.add("k", f[:10], deltas(10))
    for _ in range(5):  # anchors 0..4 are used, 5..9 are not
        pool.estimate("k", f[:5], SHAPE)
    pool.add("k", f[10:15], deltas(5, seed=3))
    assert pool.bytes_used <= pool.config.budget_bytes and pool.evicted == 5
    est = pool.estimate("k", f[:5], SHAPE)
    assert torch.all(est.distance < 1e-5)  # the used anchors survived
    for i in range(15, 30):  # a long stream never exceeds the budget
        pool.add(f"k{i % 3}", f[i : i + 1], deltas(1, seed=i))
        assert pool.bytes_used <= pool.config.budget_bytes


def test_per_key_cap_prefers_recent_anchors():
    pool = AnchorPool(AnchorConfig(neighbours=1, storage="float32", max_per_key=4, age_weight=1))
    f = unit(8)
    for i in range(8):
        pool.add("k", f[i : i + 1], deltas(1, seed=i))
    assert pool.size("k") == 4
    assert torch.all(pool.estimate("k", f[4:], SHAPE).distance < 1e-5)


@pytest.mark.parametrize(("storage", "tol"), [("float16", 2e-3), ("int8", 2e-2)])
def test_compact_storage_error_and_size(storage, tol):
    f, d = unit(50), deltas(50)
    ref = AnchorPool(AnchorConfig(neighbours=1, storage="float32"))
    small = AnchorPool(AnchorConfig(neighbours=1, storage=storage))
    ref.add("k", f, d)
    small.add("k", f, d)
    a, b = ref.estimate("k", f, SHAPE).delta, small.estimate("k", f, SHAPE).delta
    rel = (a - b).norm() / a.norm()
    assert float(rel) < tol
    assert small.bytes_used < ref.bytes_used


def test_save_load_round_trip(tmp_path):
    pool = AnchorPool(AnchorConfig(neighbours=4, storage="int8"))
    pool.add("a->b", unit(12), deltas(12))
    pool.add("c->d", unit(5, seed=3), deltas(5, seed=4))
    pool.estimate("a->b", unit(3, seed=9), SHAPE)
    path = tmp_path / "pool.kvpool"
    identity = ModelIdentity("llama", layers=3, kv_heads=2, head_dim=8)
    pool.save(path, identity)
    back = AnchorPool.load(path, identity)
    assert back.config == pool.config and back.context_keys() == pool.context_keys()
    assert back.bytes_used == pool.bytes_used and len(back) == len(pool)
    q = unit(3, seed=11)
    for key in pool.context_keys():
        x, y = pool.estimate(key, q, SHAPE), back.estimate(key, q, SHAPE)
        assert torch.equal(x.delta, y.delta) and torch.equal(x.distance, y.distance)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


@pytest.mark.parametrize(
    "bad",
    [{"neighbours": 0}, {"storage": "bf8"}, {"budget_bytes": -1}, {"max_per_key": 0}],
)
def test_bad_pool_config(bad):
    with pytest.raises(ConfigError):
        AnchorConfig(**bad)


def test_position_free_round_trip_and_phase(tiny_engine):
    rotary = tiny_engine.rotary
    layers, heads, dim = tiny_engine.adapter.kv_dims
    g = torch.Generator().manual_seed(0)
    d = KV(torch.randn(layers, heads, 6, dim, generator=g), torch.randn(layers, heads, 6, dim))
    p, q = torch.arange(100, 106), torch.arange(7, 13)
    free = position_free(d, p, rotary)
    back = at_positions(free, p, rotary)
    assert torch.allclose(back.keys, d.keys, atol=1e-5) and torch.equal(back.values, d.values)
    # a deviation observed at p and applied at q is the same rotation-free offset
    moved = at_positions(free, q, rotary)
    assert torch.allclose(position_free(moved, q, rotary).keys, free.keys, atol=1e-5)
    assert not torch.allclose(moved.keys, d.keys, atol=1e-2)


def test_features_do_not_depend_on_where_a_segment_was_stored(tiny_engine):
    from kvshare.kernels import shift_kv

    layers, heads, dim = tiny_engine.adapter.kv_dims
    g = torch.Generator().manual_seed(1)
    base = KV(torch.randn(layers, heads, 5, dim, generator=g), torch.randn(layers, heads, 5, dim))
    pos = torch.arange(5)
    moved = shift_kv(base, 40, tiny_engine.rotary)
    a = token_features(base, pos, tiny_engine.rotary, 1)
    b = token_features(moved, pos + 40, tiny_engine.rotary, 1)
    assert a.shape == (5, 2 * dim) and torch.allclose(a, b, atol=1e-5)
    assert np.allclose(a.norm(dim=1).numpy(), 1.0, atol=1e-5)


def test_knn_backends_agree():
    """The torch index (any device) returns faiss's neighbours and distances."""
    from kvshare.anchors.knn import FaissIndex, TorchIndex, index_for

    feats = unit(300, f=32).numpy()
    q = unit(40, f=32, seed=3)
    fd, fi = FaissIndex(feats, torch.device("cpu")).search(q, 5)
    td, ti = TorchIndex(feats, torch.device("cpu")).search(q, 5)
    assert torch.equal(fi, ti)
    assert torch.allclose(fd, td, atol=1e-5)
    assert TorchIndex(feats[:3], torch.device("cpu")).search(q, 5)[1].shape == (40, 3)
    assert index_for("cpu") is FaissIndex and index_for("cuda") is TorchIndex
    with pytest.raises(ConfigError, match="faiss, torch"):
        index_for("cpu", "annoy")


@pytest.mark.parametrize("device", DEVICES)
def test_pool_estimates_are_the_same_on_either_index_and_stay_on_its_device(device):
    """Same adds, same queries: the torch-index pool on ``device`` gives the faiss pool's
    estimate (Δ, distance, entropy, spread, anchors used), every tensor on ``device``."""
    cfg = AnchorConfig(neighbours=3, storage="float16", merge_distance=0.01)
    ref, dev = AnchorPool(cfg), AnchorPool(cfg, device, index="torch")
    for seed in range(3):
        f, d = unit(30, seed=seed), deltas(30, seed=10 + seed)
        assert ref.add("k", f, d) == dev.add("k", f.to(device), d.to(device))
    q = unit(12, seed=9)
    a, b = ref.estimate("k", q, SHAPE), dev.estimate("k", q.to(device), SHAPE)
    assert all(t.device.type == torch.device(device).type for t in b)
    assert torch.equal(a.anchor_ids, b.anchor_ids.cpu())
    for x, y in zip(a[:4], b[:4], strict=True):
        assert torch.allclose(x, y.cpu(), atol=1e-4, rtol=1e-4)
    dev.count_hits("k", b.anchor_ids)
    ref.count_hits("k", a.anchor_ids)
    assert ref.fingerprint() == dev.fingerprint()


@pytest.mark.parametrize("index", ["faiss", "torch"])
def test_learning_updates_the_index_in_place_never_rebuilding_it(index, monkeypatch):
    """Adds (appends and merges) and evictions (per-key cap, byte budget) keep one index per
    key, built once; after each, it answers exactly as an index of the other backend built
    fresh over the key's anchors."""
    from kvshare.anchors import knn

    built: list[int] = []
    kind = knn.index_for("cpu", index)
    monkeypatch.setattr(kind, "__init__", _counting(kind.__init__, built))
    per = AnchorPool().token_bytes(SHAPE[0], SHAPE[2], SHAPE[3])
    cfg = AnchorConfig(neighbours=3, merge_distance=0.05, max_per_key=50, budget_bytes=70 * per)
    pool = AnchorPool(cfg, index=index)
    q = unit(9, seed=99)
    for seed in range(8):
        pool.add("k", unit(20, seed=seed), deltas(20, seed=seed))
        pool.add("j", unit(5, seed=50 + seed), deltas(5, seed=seed))
        entry = pool._keys["k"]
        other = knn.TorchIndex if index == "faiss" else knn.FaissIndex
        fresh = other(entry.feats, torch.device("cpu"))
        assert entry.index.size == len(entry.feats)
        got, want = entry.index.search(q, 4), fresh.search(q, 4)
        assert torch.equal(got[1], want[1]) and torch.allclose(got[0], want[0], atol=1e-5)
    assert pool.evicted > 0 and pool.size("k") <= 50
    assert len(built) == 2  # one per key, at its first add


def _counting(init, built):
    def counted(self, feats, device):
        built.append(len(feats))
        init(self, feats, device)

    return counted
