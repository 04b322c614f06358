"""Kernel backends against the torch reference: random shapes (odd lengths, GQA layouts,
head dims whose half is not a power of two), fp32/bf16, every rotary scaling variant.

On CPU the Triton kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by
conftest); the ``gpu`` parametrisations compile them for CUDA.
"""

from __future__ import annotations

import pytest
import torch
from kvshare.kernels import KV, Move, TorchOps, kernels_for
from kvshare.kernels import backends as kb
from kvshare.kernels.triton_ops import TritonOps

from kvshare.errors import ConfigError, KernelUnavailableError

from conftest import DEVICES, tiny_model
from factories import DOC, ROPE_VARIANTS, team

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def _rotary(rope: dict | None = None, head_dim: int = 16, device: str = "cpu"):
    overrides: dict = {"hidden_size": 4 * head_dim, "num_attention_heads": 4}
    if rope is not None:
        overrides["rope_parameters"] = {"rope_theta": 10000.0, **rope}
    return tiny_model("llama", **overrides).model.rotary_emb.to(device)


def _kv(shape: tuple[int, ...], dtype: torch.dtype, device: str, seed: int) -> KV:
    g = torch.Generator().manual_seed(seed)
    return KV(
        torch.randn(*shape, generator=g).to(device, dtype),
        torch.randn(*shape, generator=g).to(device, dtype),
    )


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    err = float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6))
    assert err <= TOL[dtype], err


def _both(dst: KV) -> tuple[KV, KV]:
    return KV(dst.keys.clone(), dst.values.clone()), KV(dst.keys.clone(), dst.values.clone())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layers,heads,dim,n", [(2, 2, 16, 37), (3, 3, 48, 5), (1, 8, 64, 130)])
def test_fused_relocation_matches_the_torch_chain(device, dtype, layers, heads, dim, n):
    rotary = _rotary(head_dim=dim, device=device)
    src = _kv((layers, heads, 300, dim), torch.float32, device, 1)  # stored in float32
    dst = _kv((layers, heads, 200, dim), dtype, device, 2)
    off = _kv((layers, heads, n, dim), torch.float32, device, 3)
    for move in (
        Move(60, n, src, 17),  # relocate only
        Move(60, n, offsets=off, gains=(0.5, 0.25)),  # offsets added in place
        Move(60, n, src, 250 - n, off, (1.0, 0.75)),
        Move(60, n, offsets=off, gains=(torch.tensor(0.5, device=device), torch.tensor(0.2))),
    ):
        ref, fused = _both(dst)
        TorchOps().relocate(ref, move, rotary)
        TritonOps().relocate(fused, move, rotary)
        _close(fused.keys, ref.keys, dtype)
        _close(fused.values, ref.values, dtype)
        # slots outside [60, 60 + n) untouched
        assert torch.equal(fused.keys[:, :, :60], dst.keys[:, :, :60])
        assert torch.equal(fused.values[:, :, 60 + n :], dst.values[:, :, 60 + n :])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [1, 2, 17])
def test_relocation_with_both_starts_equal_to_one(device, n):
    """Starts and lengths of 1 are what Triton specialises to constants: a CUDA compile error
    before they were kept as plain arguments (``RELOCATE_PER_CALL``)."""
    rotary = _rotary(device=device)
    src = _kv((2, 2, 40, 16), torch.float32, device, 8)
    for move in (Move(1, n, src, 1), Move(1, n, src, 0), Move(0, n, src, 1)):
        ref, fused = _both(_kv((2, 2, 40, 16), torch.float32, device, 9))
        TorchOps().relocate(ref, move, rotary)
        TritonOps().relocate(fused, move, rotary)
        _close(fused.keys, ref.keys, torch.float32)
        assert torch.equal(fused.values, ref.values)


def test_per_call_integers_are_never_specialised():
    """Every kernel argument that changes from call to call is in the decorator's
    ``do_not_specialize``, so no call compiles a new variant for its sizes or starts."""
    from kvshare.kernels import triton_ops as to

    def unspecialised(kernel) -> set[str]:
        names = kernel.kwargs["do_not_specialize"] if hasattr(kernel, "kwargs") else None
        names = names if names is not None else kernel.do_not_specialize
        return {kernel.arg_names[a] if isinstance(a, int) else a for a in names or ()}

    assert {"n", "dst_start", "src_start"} <= unspecialised(to._relocate_kernel)
    assert {"k"} <= unspecialised(to._weighted_kernel)


@pytest.mark.parametrize("rope", ROPE_VARIANTS)
def test_fused_relocation_keeps_each_rotary_variant(rope):
    rotary = _rotary(rope)
    src = _kv((2, 2, 64, 16), torch.float32, "cpu", 4)
    ref, fused = _both(_kv((2, 2, 4000, 16), torch.float32, "cpu", 5))
    TorchOps().relocate(ref, Move(3500, 40, src, 3), rotary)
    TritonOps().relocate(fused, Move(3500, 40, src, 3), rotary)
    _close(fused.keys, ref.keys, torch.float32)


def test_dynamic_rope_falls_back_to_the_reference():
    rotary = _rotary({"rope_type": "dynamic", "factor": 2.0})
    src = _kv((2, 2, 64, 16), torch.float32, "cpu", 6)
    ref, fused = _both(_kv((2, 2, 100, 16), torch.float32, "cpu", 7))
    TorchOps().relocate(ref, Move(50, 20, src, 0), rotary)
    TritonOps().relocate(fused, Move(50, 20, src, 0), rotary)
    assert torch.equal(fused.keys, ref.keys) and torch.equal(fused.values, ref.values)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,dim", [(2, 16), (3, 48), (8, 64)])
def test_deviation_scores_and_topk_match(device, dtype, heads, dim):
    fresh = _kv((1, heads, 41, dim), dtype, device, 8)
    before = _kv((1, heads, 41, dim), dtype, device, 9)
    before = KV(
        fresh.keys + 0.1 * before.keys,
        fresh.values + before.values * torch.rand(41, 1, device=device).to(dtype),
    )
    index = torch.tensor([0, 3, 4, 17, 40, 22, 9], device=device)
    for idx in (None, index):
        ref = TorchOps().deviation(fresh, before, idx)
        got = TritonOps().deviation(fresh, before, idx)
        _close(got, ref, torch.float32 if dtype is torch.float32 else dtype)
    scores, top = TritonOps().deviation_topk(fresh, before, index, 3)
    ref = TorchOps().deviation(fresh, before, index)
    assert set(top.tolist()) == set(ref.topk(3).indices.tolist())
    assert scores.shape == (7,)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("store", [torch.float32, torch.bfloat16, torch.int8])
def test_weighted_delta_matches_for_every_storage_dtype(device, store):
    g = torch.Generator().manual_seed(10)
    m, width, n, k = 23, 2 * 2 * 2 * 48, 13, 5
    raw = torch.randn(m, width, generator=g)
    if store is torch.int8:
        scales = raw.abs().amax(1) / 127
        deltas = (raw / scales[:, None]).round().to(torch.int8)
    else:
        deltas, scales = raw.to(store), torch.ones(m)
    index = torch.randint(0, m, (n, k), generator=g)
    w = torch.softmax(torch.randn(n, k, generator=g), 1)
    args = [t.to(device) for t in (deltas, scales, index, w)]
    ref = TorchOps().weighted_delta(*args)
    got = TritonOps().weighted_delta(*args)
    assert ref.dtype == got.dtype == torch.float32
    _close(got, ref, torch.float32)


def test_registry_picks_and_refuses(monkeypatch):
    monkeypatch.delenv(kb.ENV, raising=False)
    assert kernels_for("cpu").name == "torch"  # auto: the reference off CUDA
    monkeypatch.setenv(kb.ENV, "torch")
    assert kernels_for("cpu").name == "torch"
    monkeypatch.setenv(kb.ENV, "triton")
    assert kernels_for("cpu").name == "triton"  # interpreter (conftest)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(KernelUnavailableError, match="CUDA device"):
        kernels_for("cpu")
    monkeypatch.setattr(kb, "triton_installed", lambda: False)
    with pytest.raises(KernelUnavailableError, match="not installed"):
        kernels_for("cuda")
    monkeypatch.setenv(kb.ENV, "cutlass")
    with pytest.raises(ConfigError, match="torch, triton"):
        kernels_for("cpu")


DOC2 = "Rain fell on the harbour while the ferry waited for the last train to arrive. " * 4


@pytest.mark.parametrize("mode", ["blend", "anchor", "kvshare"])
def test_engine_calls_agree_across_kernel_backends(tiny_engine, monkeypatch, mode):
    """The wiring: whole calls with the Triton kernels (relocation, deviation scoring,
    weighted Δ, offsets where trusted) give what the torch reference gives: same tokens,
    same token choice, fidelity against the ``full`` oracle within 1e-4 of the reference's.
    The second document's critic call relocates the planner's run and (anchor modes) finds
    anchors learned on the first document under the same context key. The ops' numerics
    are pinned by the op tests above (this tiny model is too forgiving to do that)."""
    runs = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv(kb.ENV, backend)
        eng = tiny_engine.fork(mode=mode, anchor_gamma=10.0)  # anchor: offsets, no fallback
        assert eng.kernels.name == backend
        runs[backend] = [
            eng.chat(team(r, doc), agent=r, max_new_tokens=4, shadow=True, teach=True)
            for doc in (DOC, DOC2)
            for r in ("planner", "critic")
        ]
        if eng.policy.anchored:
            assert len(eng.anchor_pool()) > 0
    for ref, got in zip(runs["torch"], runs["triton"], strict=True):
        assert got.tokens == ref.tokens
        assert got.stats.computed_tokens == ref.stats.computed_tokens
        assert abs(got.stats.kl - ref.stats.kl) <= 1e-4
    last = runs["triton"][-1].stats
    assert last.computed_tokens < last.prompt_tokens and last.kl < 0.05


def test_kernel_bench_checks_and_reports_honestly(tmp_path):
    from kvshare.bench.kernels import Shape, markdown, measure
    from kvshare.cli import main

    shape = Shape(layers=2, heads=2, dim=128, dtype=torch.float32)
    rows = measure([9], torch.device("cpu"), shape, repeats=1, fused=TritonOps())
    assert {r.op for r in rows} == {"relocate", "relocate+offsets", "deviation+topk", "weighted Δ"}
    assert all(r.max_rel_err is not None and r.max_rel_err < 1e-4 for r in rows)
    assert (
        main(["bench", "kernels", "--lengths", "8", "--dtype", "float32", "--out", str(tmp_path)])
        == 0
    )
    text = (tmp_path / "kernels.md").read_text()
    assert "not measured" in text and "| relocate | 8 |" in text  # no GPU: nothing estimated
    assert all(r.fused_ms is not None and r.speedup is not None for r in rows)
    assert "| relocate | 9 |" in markdown(rows, "cpu")
