"""Anchor pool files: exact round trip, every corruption refused, atomic saves, finite content."""

from __future__ import annotations

import dataclasses
import errno
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from kvshare.anchors import AnchorConfig, AnchorPool, ModelIdentity, persist

from kvshare.errors import ConfigError, ModelMismatchError, StateFileError

IDENTITY = ModelIdentity("llama", layers=4, kv_heads=2, head_dim=16)
SHAPE = (4, 2, 2, 16)  # L, 2, H, D
FEATURES = 32
CORRUPTIONS = 200


def unit(n: int, seed: int) -> torch.Tensor:
    x = torch.randn(n, FEATURES, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=1, keepdim=True)


def deltas(n: int, seed: int) -> torch.Tensor:
    """[L, 2, H, n, D] random deviations."""
    layers, two, heads, dim = SHAPE
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layers, two, heads, n, dim, generator=g)


def filled_pool(storage: str) -> AnchorPool:
    """Several keys, merged and evicted anchors, hits and gains: a pool after some use."""
    pool = AnchorPool(AnchorConfig(storage=storage, max_per_key=40, merge_distance=0.05))
    for i, key in enumerate(["planner:m1->coder:m1", "coder:m2->critic:m1", "a->b"]):
        f = unit(30, seed=i)
        pool.add(key, f, deltas(30, seed=10 + i))
        pool.add(key, torch.cat([f[:5] + 1e-3, unit(20, seed=50 + i)]), deltas(25, seed=20 + i))
        pool.estimate(key, unit(8, seed=70 + i), SHAPE)
        pool.record_gain(key, 0.25 * i, 1.0 - 0.1 * i)
    return pool


@pytest.fixture(params=["int8", "float16"])
def saved(request, tmp_path: Path) -> tuple[AnchorPool, Path]:
    pool = filled_pool(request.param)
    path = tmp_path / "pool.kvpool"
    pool.save(path, IDENTITY)
    return pool, path


def same_estimates(a: AnchorPool, b: AnchorPool) -> bool:
    q = unit(6, seed=99)
    for key in a.context_keys():
        x, y = a.estimate(key, q, SHAPE), b.estimate(key, q, SHAPE)
        if not all(torch.equal(u, v) for u, v in zip(x, y, strict=True)):
            return False
    return True


def test_round_trip_preserves_everything(saved):
    pool, path = saved
    back = AnchorPool.load(path, IDENTITY)
    assert back.config == pool.config and back.context_keys() == pool.context_keys()
    assert back.bytes_used == pool.bytes_used and len(back) == len(pool) > 60
    assert all(back.gain(k) == pool.gain(k) for k in pool.context_keys())
    assert same_estimates(pool, back)
    assert AnchorPool.load(path).context_keys() == pool.context_keys()  # identity optional
    assert list(path.parent.iterdir()) == [path]


def corrupt(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One seeded corruption: flip 1 byte, flip 2-16 bytes (anywhere or in the first KiB,
    where the prefix and header live) or truncate."""
    kind = rng.choice(["flip1", "flip_many", "flip_header", "truncate"])
    if kind == "truncate":
        return kind, data[: rng.randrange(len(data))]
    buf = bytearray(data)
    count = 1 if kind == "flip1" else rng.randint(2, 16)
    span = min(len(buf), 1024) if kind == "flip_header" else len(buf)
    for _ in range(count):
        buf[rng.randrange(span)] ^= rng.randint(1, 255)
    return kind, bytes(buf)


def test_every_corruption_is_refused(saved, tmp_path):
    _, path = saved
    data = path.read_bytes()
    bad = tmp_path / "bad.kvpool"
    refused, kinds = 0, set()
    for seed in range(CORRUPTIONS):
        kind, mutated = corrupt(data, random.Random(seed))
        kinds.add(kind)
        bad.write_bytes(mutated)
        try:
            AnchorPool.load(bad, IDENTITY)
        except StateFileError:
            refused += 1
    assert refused == CORRUPTIONS, f"{CORRUPTIONS - refused} corrupt files loaded silently"
    assert kinds == {"flip1", "flip_many", "flip_header", "truncate"}


def test_missing_empty_and_foreign_files(tmp_path):
    with pytest.raises(StateFileError, match="nowhere.kvpool"):
        AnchorPool.load(tmp_path / "nowhere.kvpool")
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(StateFileError, match="not a kvshare anchor pool"):
        AnchorPool.load(empty)
    old = tmp_path / "old.pt"  # the former torch.save format
    torch.save({"config": {}, "keys": {}}, old)
    with pytest.raises(StateFileError, match="not a kvshare anchor pool"):
        AnchorPool.load(old)


def _nan_delta(s: persist.PoolState) -> None:
    next(iter(s.keys.values())).deltas[0, 0, 0, 0, 0] = float("nan")


def _inf_feature(s: persist.PoolState) -> None:
    next(iter(s.keys.values())).feats[1, 2] = float("inf")


def _zero_scale(s: persist.PoolState) -> None:
    next(iter(s.keys.values())).scales[0] = 0.0


def _gain_above_one(s: persist.PoolState) -> None:
    s.gains["a->b"] = (1.5, 0.5)


def _counts_as_float32(s: persist.PoolState) -> None:
    key = next(iter(s.keys.values()))
    key.counts = key.counts.float()


def _short_scales(s: persist.PoolState) -> None:
    key = next(iter(s.keys.values()))
    key.scales = key.scales[:-1]


def _wider_features(s: persist.PoolState) -> None:
    key = next(iter(s.keys.values()))
    key.feats = torch.cat([key.feats, key.feats], dim=1)


def _born_in_the_future(s: persist.PoolState) -> None:
    next(iter(s.keys.values())).born[0] = s.tick + 1


def _deltas_in_float32(s: persist.PoolState) -> None:
    key = next(iter(s.keys.values()))
    key.deltas = key.deltas.float()


def _bad_config(s: persist.PoolState) -> None:
    s.config["neighbours"] = 0


def _unknown_option(s: persist.PoolState) -> None:
    s.config["colour"] = "blue"


def _config_storage_disagrees(s: persist.PoolState) -> None:
    s.config["storage"] = "float32"


def _budget_exceeded(s: persist.PoolState) -> None:
    s.config["budget_bytes"] = 1000


def _identity_disagrees_with_shapes(s: persist.PoolState) -> None:
    s.identity = dataclasses.replace(IDENTITY, layers=5)


@pytest.mark.parametrize(
    "mutate",
    [
        _nan_delta,
        _inf_feature,
        _zero_scale,
        _gain_above_one,
        _counts_as_float32,
        _short_scales,
        _wider_features,
        _born_in_the_future,
        _deltas_in_float32,
        _bad_config,
        _unknown_option,
        _config_storage_disagrees,
        _budget_exceeded,
        _identity_disagrees_with_shapes,
    ],
)
def test_bad_content_with_a_valid_checksum_is_refused(tmp_path, mutate):
    pool = filled_pool("float16")
    good = tmp_path / "good.kvpool"
    pool.save(good, IDENTITY)
    state = persist.read_state(good)
    mutate(state)
    bad = tmp_path / "bad.kvpool"
    persist.write_state(bad, state)  # written through the format code: checksum is valid
    with pytest.raises(StateFileError) as info:
        AnchorPool.load(bad)
    assert not isinstance(info.value, ModelMismatchError)
    if mutate is _nan_delta:
        assert "NaN" in str(info.value)


def test_unknown_format_version_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(persist, "FORMAT_VERSION", 2)
    filled_pool("int8").save(tmp_path / "v2.kvpool")
    monkeypatch.undo()
    with pytest.raises(StateFileError, match="unknown format version 2"):
        AnchorPool.load(tmp_path / "v2.kvpool")


@pytest.mark.parametrize(
    ("field", "value"),
    [("architecture", "qwen2"), ("layers", 30), ("kv_heads", 3), ("head_dim", 64)],
)
def test_a_pool_for_another_model_is_refused(saved, field, value):
    _, path = saved
    other = dataclasses.replace(IDENTITY, **{field: value})
    with pytest.raises(ModelMismatchError, match=field):
        AnchorPool.load(path, other)


def test_a_pool_without_identity_is_checked_against_the_shapes(tmp_path):
    path = tmp_path / "anon.kvpool"
    filled_pool("int8").save(path)
    assert len(AnchorPool.load(path, IDENTITY)) > 0
    with pytest.raises(ModelMismatchError, match="layers, heads, head_dim"):
        AnchorPool.load(path, dataclasses.replace(IDENTITY, kv_heads=4))


def _fail_midway(fh, chunks):
    fh.write(chunks[0][:5])
    raise OSError(errno.ENOSPC, "No space left on device")


def _fail(*args, **kwargs):
    raise OSError(errno.EIO, "Input/output error")


@pytest.mark.parametrize(
    ("target", "replacement"),
    [("_write_chunks", _fail_midway), ("os.fsync", _fail), ("os.replace", _fail)],
)
def test_a_failed_save_keeps_the_old_file_and_leaves_no_temp(
    saved, monkeypatch, target, replacement
):
    pool, path = saved
    before = path.read_bytes()
    pool.add("new->key", unit(3, seed=5), deltas(3, seed=6))
    if target.startswith("os."):
        monkeypatch.setattr(persist.os, target[3:], replacement)
    else:
        monkeypatch.setattr(persist, target, replacement)
    with pytest.raises(StateFileError, match="could not write the anchor pool"):
        pool.save(path, IDENTITY)
    monkeypatch.undo()
    assert path.read_bytes() == before and list(path.parent.iterdir()) == [path]
    assert "new->key" not in AnchorPool.load(path, IDENTITY).context_keys()


def test_save_into_an_unusable_place_names_it(tmp_path):
    pool = filled_pool("int8")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(StateFileError, match="writable directory"):
        pool.save(blocker / "pool.kvpool")
    (tmp_path / "a-dir").mkdir()
    with pytest.raises(StateFileError, match="a-dir"):
        pool.save(tmp_path / "a-dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-dir", "a-file"]


def test_non_finite_gains_are_never_written(tmp_path):
    pool = filled_pool("int8")
    pool.record_gain("a->b", float("nan"), 0.5)
    with pytest.raises(StateFileError, match="cannot be written"):
        pool.save(tmp_path / "pool.kvpool")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("storage", ["float32", "float16", "int8"])
def test_add_drops_non_finite_tokens(storage):
    pool = AnchorPool(AnchorConfig(storage=storage, merge_distance=0.0))
    f, d = unit(6, seed=1), deltas(6, seed=2)
    f[1, 0] = float("nan")
    d[2, 1, 0, 2, 3] = float("inf")
    d[0, 0, 1, 3, 0] = float("nan")
    d[1, 0, 0, 4, 0] = 1e5 if storage == "float16" else float("-inf")  # 1e5 overflows fp16
    assert pool.add("k", f, d) == 2 and pool.rejected_nonfinite == 4
    assert pool.add("k", f[1:2], d[:, :, :, 1:2]) == 0 and pool.rejected_nonfinite == 5
    est = pool.estimate("k", unit(4, seed=3), SHAPE)
    assert torch.isfinite(est.delta).all() and pool.size("k") == 2


def test_identity_of_a_model_config():
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2
    )
    assert ModelIdentity.of(SimpleNamespace(config=cfg)) == ModelIdentity("llama", 3, 2, 16)
    bare = SimpleNamespace(
        model_type="qwen2",
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=None,
        hidden_size=256,
    )
    assert ModelIdentity.of(SimpleNamespace(config=bare)) == ModelIdentity("qwen2", 2, 8, 32)
    with pytest.raises(ConfigError, match="layers"):
        ModelIdentity("llama", 0, 2, 16)


def test_merging_huge_but_finite_deltas_stays_finite():
    pool = AnchorPool(AnchorConfig(storage="float32", neighbours=1, merge_distance=1.0))
    f, d = unit(1, seed=1), torch.full((4, 2, 2, 1, 16), 3e38)
    for _ in range(3):
        pool.add("k", f, d)
    assert pool.size("k") == 1 and pool.rejected_nonfinite == 0
    assert torch.isfinite(pool.estimate("k", f, SHAPE).delta).all()
