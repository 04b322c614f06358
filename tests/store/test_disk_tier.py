"""DiskTier: bit-exact round trips, scoped and verified lookups, budgets, restarts, corrupt
files, crashes in the middle of a write, threads, and KV that outlives its file."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading

import pytest
import safetensors.torch
import torch
from kvshare.anchors import ModelIdentity
from kvshare.kernels import KV

from kvshare.errors import CacheDirError, ConfigError, ScopeError
from kvshare.scope import GLOBAL, Scope
from kvshare.store.disk import DiskTier, file_name
from kvshare.store.segments import StoredSegment

IDENTITY = ModelIdentity("llama", 3, 5, 9)
SCOPE = Scope("session", "tenant-a", None)
SHAPE = (3, 5, 7, 9)  # [L, H, S, D], odd on purpose


def kv_of(seed: int, dtype: torch.dtype = torch.float32, shape: tuple = SHAPE) -> KV:
    g = torch.Generator().manual_seed(seed)
    keys, values = (torch.randn(*shape, generator=g).to(dtype) for _ in range(2))
    if dtype.is_floating_point:  # bit patterns that a compare by value misses
        keys.view(-1)[:2] = torch.tensor([float("nan"), -0.0])
    return KV(keys, values)


def segment(
    name: str = "h0", scope: object = SCOPE, seed: int = 0, dtype: torch.dtype = torch.float32
) -> StoredSegment:
    kv = kv_of(seed, dtype)
    tokens = tuple(range(seed, seed + kv.length))
    return StoredSegment(scope, name, tokens, kv, "prompt", "user", "writer", 4, "m1", ((0, "m1"),))


def files(tier: DiskTier) -> list[str]:
    return sorted(os.listdir(tier.path))


def same_bits(a: KV, b: KV) -> bool:
    return all(
        x.dtype == y.dtype and torch.equal(x.view(torch.uint8), y.view(torch.uint8))
        for x, y in ((a.keys, b.keys), (a.values, b.values))
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_bit_exact(tmp_path, dtype):
    tier, seg = DiskTier(tmp_path, 1 << 20, IDENTITY), segment(dtype=dtype)
    assert tier.put(seg) and tier.bytes_used == seg.nbytes
    got = tier.get(seg.key, seg.tokens)
    assert got is not None and got.kv.keys.device.type == "cpu" and same_bits(got.kv, seg.kv)
    assert fields_of(got) == fields_of(seg)
    plain = safetensors.torch.load_file(tier.path / file_name(*seg.key))  # a plain safetensors file
    assert same_bits(KV(plain["keys"], plain["values"]), seg.kv)


def fields_of(seg: StoredSegment) -> tuple:
    return (seg.scope, seg.content_hash, seg.tokens, seg.kind, seg.role, seg.agent,
            seg.source_start, seg.slot, seg.bounds)  # fmt: skip


@pytest.mark.parametrize(
    "scope", [GLOBAL, Scope("tenant", "a"), Scope("session", None, "s", True), "plain", ""]
)
def test_scopes_round_trip_exactly_across_a_restart(tmp_path, scope):
    DiskTier(tmp_path, 1 << 20, IDENTITY).put(segment(scope=scope))
    tier = DiskTier(tmp_path, 1 << 20, IDENTITY)
    [(found, _)] = tier.keys()
    assert found == scope and type(found) is type(scope)
    assert tier.get((scope, "h0"), segment().tokens) is not None


def test_lookups_need_the_same_tokens_and_the_same_scope(tmp_path):
    tier, seg = DiskTier(tmp_path, 1 << 20, IDENTITY), segment()
    tier.put(seg)
    assert tier.get(seg.key, seg.tokens[:-1] + (99,)) is None
    assert tier.get(seg.key, seg.tokens[:-1]) is None
    for other in (Scope("session", "tenant-a", ""), Scope("tenant", "tenant-a"), "tenant-a"):
        assert tier.get((other, "h0"), seg.tokens) is None
    assert tier.get(seg.key, seg.tokens) is not None and tier.corrupt == 0  # mismatches kept it


def test_budget_refuses_what_does_not_fit_and_never_evicts(tmp_path):
    first, second = segment("a"), segment("b", seed=1)
    tier = DiskTier(tmp_path, first.nbytes * 3 // 2, IDENTITY)
    assert tier.put(first) and not tier.put(second)
    assert tier.put(first)  # already present: left as it is
    assert tier.keys() == [first.key] and tier.bytes_used == first.nbytes <= tier.budget_bytes
    assert len(files(tier)) == 1
    assert tier.remove(first.key) == first.nbytes and tier.remove(first.key) == 0
    assert tier.put(second) and files(tier) == [file_name(*second.key)]
    assert not DiskTier(tmp_path / "zero", 0, IDENTITY).put(first)


def test_unstorable_segments_raise_before_anything_is_written(tmp_path):
    tier = DiskTier(tmp_path, 1 << 20, IDENTITY)
    for scope in [("tenant", "a"), 7, Scope("tenant", 5), Scope("session", "a", None, 1)]:
        with pytest.raises(ScopeError):
            tier.put(segment(scope=scope))
    with pytest.raises(ConfigError):
        tier.put(segment(dtype=torch.int64))
    assert files(tier) == [] and tier.bytes_used == 0 and len(tier) == 0


def test_bad_arguments_are_named_errors(tmp_path):
    with pytest.raises(ConfigError):
        DiskTier(tmp_path, -1, IDENTITY)
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(CacheDirError):
        DiskTier(tmp_path / "file", 1 << 20, IDENTITY)


def test_a_restart_finds_the_segments_and_another_model_does_not(tmp_path):
    segs = [segment("a"), segment("b", seed=1, dtype=torch.bfloat16)]
    for seg in segs:
        DiskTier(tmp_path, 1 << 20, IDENTITY).put(seg)
    again = DiskTier(tmp_path, 1 << 20, IDENTITY)
    assert set(again.keys()) == {s.key for s in segs}
    assert again.bytes_used == sum(s.nbytes for s in segs)
    assert all(same_bits(again.get(s.key, s.tokens).kv, s.kv) for s in segs)
    other = DiskTier(tmp_path, 1 << 20, ModelIdentity("llama", 3, 5, 8))
    assert len(other) == 0 and other.get(segs[0].key, segs[0].tokens) is None
    other.put(segs[0])
    other.clear()
    assert len(other) == 0 and files(other) == []
    assert len(DiskTier(tmp_path, 1 << 20, IDENTITY)) == 2  # the first model's files are kept


def test_a_restart_with_a_smaller_budget_keeps_the_newest(tmp_path):
    tier = DiskTier(tmp_path, 1 << 20, IDENTITY)
    segs = [segment(str(i), seed=i) for i in range(3)]
    for i, seg in enumerate(segs):
        tier.put(seg)
        os.utime(tier.path / file_name(*seg.key), ns=(i * 10**9, i * 10**9))
    small = DiskTier(tmp_path, segs[0].nbytes * 2, IDENTITY)
    assert set(small.keys()) == {segs[1].key, segs[2].key} and small.dropped == 1
    assert small.bytes_used <= small.budget_bytes and len(files(small)) == 2


def flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


CORRUPTIONS = {
    "flipped tensor byte": flip_last_byte,
    "truncated": lambda data: data[: len(data) - 9],
    "garbage header": lambda data: b"\xff" * 16 + data[16:],
    "not safetensors": lambda data: b"garbage",
    "edited tokens": lambda data: data.replace(b'tokens\\":[0,', b'tokens\\":[5,'),
}


@pytest.mark.parametrize("restart", [False, True])
@pytest.mark.parametrize("mutate", CORRUPTIONS.values(), ids=list(CORRUPTIONS))
def test_a_corrupt_file_is_a_counted_miss_and_is_deleted(tmp_path, mutate, restart):
    tier, seg = DiskTier(tmp_path, 1 << 20, IDENTITY), segment()
    tier.put(seg)
    path = tier.path / file_name(*seg.key)
    data = path.read_bytes()
    assert mutate(data) != data
    path.write_bytes(mutate(data))
    if restart:
        tier = DiskTier(tmp_path, 1 << 20, IDENTITY)
    assert tier.get(seg.key, seg.tokens) is None
    assert tier.corrupt == 1 and not path.exists() and tier.bytes_used == 0 and seg.key not in tier


def test_a_file_under_another_segments_name_is_a_counted_miss(tmp_path):
    tier, first, second = DiskTier(tmp_path, 1 << 20, IDENTITY), segment("a"), segment("b")
    tier.put(first)
    tier.put(second)
    path = tier.path / file_name(*second.key)
    path.write_bytes((tier.path / file_name(*first.key)).read_bytes())
    assert tier.get(second.key, second.tokens) is None and tier.corrupt == 1
    assert not path.exists() and tier.get(first.key, first.tokens) is not None


CHILD = """
import os, signal, sys, torch
from kvshare.anchors import ModelIdentity
from kvshare.store.disk import DiskTier
from kvshare.kernels import KV
from kvshare.store.segments import StoredSegment

where, point = sys.argv[1], sys.argv[2]
tier = DiskTier(where, 1 << 24, ModelIdentity("llama", 3, 5, 9))
real, calls = getattr(os, point), []

def crash(*args):
    calls.append(args)
    if point == "write" and len(calls) == 2:  # the header is written, then half the keys
        real(args[0], bytes(args[1][: len(args[1]) // 2]))
        os.fsync(args[0])
    if point == "replace" or len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args)

setattr(os, point, crash)
kv = KV(torch.ones(3, 5, 64, 9), torch.ones(3, 5, 64, 9))
tier.put(StoredSegment("s", "crash", tuple(range(64)), kv, "prompt", "user", None, 0))
"""


@pytest.mark.parametrize("point", ["write", "replace"])
def test_a_writer_killed_mid_write_leaves_nothing_loadable(tmp_path, point):
    kept = segment()
    DiskTier(tmp_path, 1 << 20, IDENTITY).put(kept)
    run = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), point], timeout=120)
    assert run.returncode == -signal.SIGKILL
    [model_dir] = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert any(name.endswith(".tmp") for name in os.listdir(model_dir))  # it died mid-write
    tier = DiskTier(tmp_path, 1 << 20, IDENTITY)
    assert tier.keys() == [kept.key] and tier.get(("s", "crash"), range(64)) is None
    assert files(tier) == [file_name(*kept.key)] and tier.corrupt == 0  # the temp is gone
    assert same_bits(tier.get(kept.key, kept.tokens).kv, kept.kv)


def test_a_live_writers_temp_file_is_left_alone(tmp_path):
    model_dir = DiskTier(tmp_path, 1 << 20, IDENTITY).path
    temp = model_dir / f".{os.getpid()}.inflight.tmp"
    temp.write_bytes(b"half")
    assert len(DiskTier(tmp_path, 1 << 20, IDENTITY)) == 0 and temp.exists()


def test_threads_keep_the_accounting_consistent(tmp_path):
    segs = {f"k{i}": segment(f"k{i}", seed=i) for i in range(12)}
    tier = DiskTier(tmp_path, 5 * segs["k0"].nbytes, IDENTITY)
    errors: list[str] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(60):
            seg = segs[rng.choice(list(segs))]
            op = rng.choice(("put", "get", "remove"))
            if op == "put":
                tier.put(seg)
            elif op == "remove":
                tier.remove(seg.key)
            elif (got := tier.get(seg.key, seg.tokens)) and not same_bits(got.kv, seg.kv):
                errors.append(f"wrong KV for {seg.content_hash}")
            if tier.bytes_used > tier.budget_bytes:
                errors.append("over budget")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    keys = tier.keys()
    assert errors == [] and tier.corrupt == 0 and tier.write_errors == 0
    assert tier.bytes_used == sum(segs[h].nbytes for _, h in keys) <= tier.budget_bytes
    assert files(tier) == sorted(file_name(*k) for k in keys)  # no temp and no orphan left
    assert set(DiskTier(tmp_path, tier.budget_bytes, IDENTITY).keys()) == set(keys)


def test_kv_handed_out_stays_valid_after_its_file_is_removed(tmp_path):
    tier, seg = DiskTier(tmp_path, 1 << 20, IDENTITY), segment()
    tier.put(seg)
    first, second = tier.get(seg.key, seg.tokens), tier.get(seg.key, seg.tokens)
    assert first is not None and second is not None
    assert tier.remove(seg.key) == seg.nbytes and files(tier) == []
    assert same_bits(first.kv, seg.kv)
    tier.put(segment(seed=0))  # the same key again: a new file, not the old one rewritten
    tier.clear()
    assert files(tier) == [] and tier.bytes_used == 0
    second.kv.keys.add_(1)  # private pages: writable, and nothing reaches the deleted file
    assert same_bits(first.kv, seg.kv)
    assert float(second.kv.values.sum()) == float(seg.kv.values.sum())


@pytest.fixture
def held_writer(monkeypatch):
    """The writer thread blocks in its write until the returned event is set."""
    import kvshare.store.disk as disk_tier

    go, real = threading.Event(), disk_tier.write_temp

    def slow(directory, chunks):
        assert go.wait(10)
        return real(directory, chunks)

    monkeypatch.setattr(disk_tier, "write_temp", slow)
    return go


def test_a_put_written_behind_is_served_from_memory_then_from_its_file(tmp_path, held_writer):
    tier, seg = DiskTier(tmp_path, 1 << 20, IDENTITY, write_behind=1 << 20), segment()
    assert tier.put(seg) and files(tier) == []  # returned before the write
    assert seg.key in tier and tier.bytes_used == seg.nbytes and tier.keys() == [seg.key]
    got = tier.get(seg.key, seg.tokens)
    assert got is not None and same_bits(got.kv, seg.kv)
    held_writer.set()
    tier.flush()
    assert files(tier) == [file_name(SCOPE, "h0")] and tier.write_errors == 0
    again = DiskTier(tmp_path, 1 << 20, IDENTITY)
    got = again.get(seg.key, seg.tokens)
    assert got is not None and same_bits(got.kv, seg.kv)


def test_removing_a_segment_still_written_behind_cancels_its_write(tmp_path, held_writer):
    tier, seg = DiskTier(tmp_path, 1 << 20, IDENTITY, write_behind=1 << 20), segment()
    tier.put(seg)
    assert tier.remove(seg.key) == seg.nbytes and seg.key not in tier and tier.bytes_used == 0
    held_writer.set()
    tier.flush()
    while tier.writing:  # the writer finishes the cancelled write and exits
        threading.Event().wait(0.01)
    assert files(tier) == [] and tier.get(seg.key, seg.tokens) is None


def test_a_write_behind_that_fails_is_counted_and_the_segment_is_gone(tmp_path, monkeypatch):
    import kvshare.store.disk as disk_tier

    def full(directory, chunks):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(disk_tier, "write_temp", full)
    tier, seg = DiskTier(tmp_path, 1 << 20, IDENTITY, write_behind=1 << 20), segment()
    assert tier.put(seg)
    tier.flush()
    assert tier.write_errors == 1 and tier.bytes_used == 0 and seg.key not in tier
    assert tier.get(seg.key, seg.tokens) is None and files(tier) == []


def test_beyond_the_write_behind_cap_the_caller_writes(tmp_path, held_writer):
    first, second = segment("h0", seed=0), segment("h1", seed=1)
    tier = DiskTier(tmp_path, 1 << 20, IDENTITY, write_behind=first.nbytes)
    tier.put(first)  # behind: the writer holds it
    held_writer.set()  # (the caller's own write goes through the same function)
    assert tier.put(second) and file_name(SCOPE, "h1") in files(tier)
    tier.flush()
    assert len(files(tier)) == 2


def test_opening_a_tier_flushes_the_writes_behind_of_a_live_one(tmp_path, held_writer):
    tier, seg = DiskTier(tmp_path, 1 << 20, IDENTITY, write_behind=1 << 20), segment()
    tier.put(seg)
    threading.Timer(0.2, held_writer.set).start()
    again = DiskTier(tmp_path, 1 << 20, IDENTITY)  # waits for the write, then finds the file
    assert seg.key in again and again.get(seg.key, seg.tokens) is not None
