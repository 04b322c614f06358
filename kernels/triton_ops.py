"""Triton kernels of the hot-path ops (imported only through ``kernels.backends``).

Each kernel has a thin wrapper that checks devices, dtypes and strides and falls back to the
torch reference where a kernel does not apply (a rotary embedding without a static
``inv_freq``, e.g. dynamic NTK scaling). ``TRITON_INTERPRET=1`` runs them on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from kvshare.kernels.kv import KV
from kvshare.kernels.ops import KernelOps, Move
from kvshare.kernels.torch_ops import TorchOps
from torch import Tensor, nn

from kvshare.errors import ConfigError

_FLOATS = {"torch.float32", "torch.float16", "torch.bfloat16"}
# Integer arguments that change from call to call: never specialised (Triton turns an int
# equal to 1 into a constant, so two starts equal to 1 made ``dst_start - src_start`` a
# Python int and the kernel failed to compile; and every new value class recompiled).
RELOCATE_PER_CALL = ("n", "dst_start", "src_start")
WEIGHTED_PER_CALL = ("k",)


@triton.jit(do_not_specialize=RELOCATE_PER_CALL)
def _relocate_kernel(
    dk, dv, sk, sv, ok, ov, inv_freq, gains,
    n, heads, half, dst_start, src_start, gk, gv,
    d_l, d_h, d_s, s_l, s_h, s_s, o_l, o_h, o_s,
    HAS_SRC: tl.constexpr, HAS_OFF: tl.constexpr, GAIN_PTR: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    """One (layer, head) and BT tokens per program; keys as two halves (rotate_half).
    Gains: the scalars ``gk``/``gv``, or (GAIN_PTR) two float32 values on the device.
    Offsets are int64: ``layer * d_l`` passes 2**31 past ~67K tokens on an 8B shape."""
    lh = tl.program_id(1).to(tl.int64)
    layer, head = lh // heads, lh % heads
    t = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
    d = tl.arange(0, BD)
    tm, dm = t < n, d < half
    m = tm[:, None] & dm[None, :]
    freq = tl.load(inv_freq + d, mask=dm, other=0.0)
    dst = dst_start + t
    dp = layer * d_l + head * d_h + dst[:, None] * d_s + d[None, :]
    if HAS_SRC:
        sp = layer * s_l + head * s_h + (src_start + t)[:, None] * s_s + d[None, :]
        x1 = tl.load(sk + sp, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(sk + sp + half, mask=m, other=0.0).to(tl.float32)
        ang = (dst_start - src_start).to(tl.float32) * freq[None, :]
        c, s = tl.cos(ang), tl.sin(ang)
        k1, k2 = x1 * c - x2 * s, x2 * c + x1 * s
        v1 = tl.load(sv + sp, mask=m, other=0.0).to(tl.float32)
        v2 = tl.load(sv + sp + half, mask=m, other=0.0).to(tl.float32)
    else:
        k1 = tl.load(dk + dp, mask=m, other=0.0).to(tl.float32)
        k2 = tl.load(dk + dp + half, mask=m, other=0.0).to(tl.float32)
        v1 = tl.load(dv + dp, mask=m, other=0.0).to(tl.float32)
        v2 = tl.load(dv + dp + half, mask=m, other=0.0).to(tl.float32)
    if GAIN_PTR:
        gk = tl.load(gains)
        gv = tl.load(gains + 1)
    if HAS_OFF:
        op = layer * o_l + head * o_h + t[:, None] * o_s + d[None, :]
        a1 = tl.load(ok + op, mask=m, other=0.0).to(tl.float32)
        a2 = tl.load(ok + op + half, mask=m, other=0.0).to(tl.float32)
        ang = dst.to(tl.float32)[:, None] * freq[None, :]
        c, s = tl.cos(ang), tl.sin(ang)
        k1 += gk * (a1 * c - a2 * s)
        k2 += gk * (a2 * c + a1 * s)
        v1 += gv * tl.load(ov + op, mask=m, other=0.0).to(tl.float32)
        v2 += gv * tl.load(ov + op + half, mask=m, other=0.0).to(tl.float32)
    out = dk.dtype.element_ty
    tl.store(dk + dp, k1.to(out), mask=m)
    tl.store(dk + dp + half, k2.to(out), mask=m)
    tl.store(dv + dp, v1.to(out), mask=m)
    tl.store(dv + dp + half, v2.to(out), mask=m)


@triton.jit
def _deviation_kernel(
    fk, fv, bk, bv, index, out,
    heads, dim, f_h, f_s, b_h, b_s,
    HAS_INDEX: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    """One token per program: ‖ΔK‖/‖K‖ + ‖ΔV‖/‖V‖ over [H, D] in float32."""
    i = tl.program_id(0).to(tl.int64)
    tok = tl.load(index + i).to(tl.int64) if HAS_INDEX else i
    h = tl.arange(0, BH).to(tl.int64)
    d = tl.arange(0, BD)
    m = (h < heads)[:, None] & (d < dim)[None, :]
    fp = h[:, None] * f_h + tok * f_s + d[None, :]
    bp = h[:, None] * b_h + tok * b_s + d[None, :]
    ka = tl.load(fk + fp, mask=m, other=0.0).to(tl.float32)
    kb = tl.load(bk + bp, mask=m, other=0.0).to(tl.float32)
    va = tl.load(fv + fp, mask=m, other=0.0).to(tl.float32)
    vb = tl.load(bv + bp, mask=m, other=0.0).to(tl.float32)
    rk = tl.sqrt(tl.sum(tl.sum((ka - kb) * (ka - kb), 1), 0))
    rk = rk / tl.maximum(tl.sqrt(tl.sum(tl.sum(ka * ka, 1), 0)), 1e-6)
    rv = tl.sqrt(tl.sum(tl.sum((va - vb) * (va - vb), 1), 0))
    rv = rv / tl.maximum(tl.sqrt(tl.sum(tl.sum(va * va, 1), 0)), 1e-6)
    tl.store(out + i, rk + rv)


@triton.jit(do_not_specialize=WEIGHTED_PER_CALL)
def _weighted_kernel(
    deltas, scales, index, w, out, width, k, stride_d,
    BF: tl.constexpr,
):  # fmt: skip
    """One output row and BF values per program: Σ_j w_j·scale_j·Δ[row_j] in float32."""
    i = tl.program_id(0).to(tl.int64)
    f = tl.program_id(1).to(tl.int64) * BF + tl.arange(0, BF)
    fm = f < width
    acc = tl.zeros((BF,), dtype=tl.float32)
    for j in range(k):
        row = tl.load(index + i * k + j).to(tl.int64)
        wj = tl.load(w + i * k + j) * tl.load(scales + row)
        acc += wj * tl.load(deltas + row * stride_d + f, mask=fm, other=0).to(tl.float32)
    tl.store(out + i * width + f, acc, mask=fm)


def _inner_contiguous(*tensors: Tensor) -> bool:
    return all(t.stride(-1) == 1 for t in tensors)


def _check_float(where: str, *tensors: Tensor) -> None:
    for t in tensors:
        if str(t.dtype) not in _FLOATS:
            raise ConfigError(f"{where}: unsupported dtype {t.dtype} (float32/float16/bfloat16)")


class TritonOps(KernelOps):
    """Fused single-pass kernels; the torch reference where a kernel does not apply."""

    name = "triton"

    def __init__(self) -> None:
        self.reference = TorchOps()

    def relocate(self, dst: KV, move: Move, rotary: nn.Module) -> None:
        inv_freq = _static_inv_freq(rotary)
        src, offsets, n = move.src, move.offsets, move.n
        parts = [dst.keys, dst.values] + ([src.keys, src.values] if src is not None else [])
        parts += [offsets.keys, offsets.values] if offsets is not None else []
        if n == 0 or inv_freq is None or not _same_layout(dst, src, offsets, parts):
            self.reference.relocate(dst, move, rotary)
            return
        _check_float("relocate", *parts)
        layers, heads, _, dim = dst.keys.shape
        sk = src if src is not None else dst
        ok = offsets if offsets is not None else dst
        on_device = any(isinstance(g, torch.Tensor) for g in move.gains)
        gains = _gain_pair(move.gains, dst.keys) if on_device else inv_freq
        scalars = (1.0, 1.0) if on_device else tuple(float(g) for g in move.gains)
        bt = 16
        grid = (triton.cdiv(n, bt), layers * heads)
        _relocate_kernel[grid](
            dst.keys, dst.values, sk.keys, sk.values, ok.keys, ok.values,
            inv_freq.to(dst.keys.device), gains,
            n, heads, dim // 2, move.at, move.src_start, *scalars,
            *dst.keys.stride()[:3], *sk.keys.stride()[:3], *ok.keys.stride()[:3],
            HAS_SRC=src is not None, HAS_OFF=offsets is not None, GAIN_PTR=on_device,
            BT=bt, BD=triton.next_power_of_2(dim // 2),
        )  # fmt: skip

    def deviation(self, fresh: KV, before: KV, index: Tensor | None = None) -> Tensor:
        parts = (fresh.keys, fresh.values, before.keys, before.values)
        if not _inner_contiguous(*parts) or fresh.keys.stride() != fresh.values.stride():
            return self.reference.deviation(fresh, before, index)
        if before.keys.stride() != before.values.stride():
            return self.reference.deviation(fresh, before, index)
        _check_float("deviation", *parts)
        _, heads, s, dim = fresh.keys.shape
        count = s if index is None else index.numel()
        out = fresh.keys.new_empty(count, dtype=torch.float32)
        if count == 0:
            return out
        _deviation_kernel[(count,)](
            fresh.keys, fresh.values, before.keys, before.values,
            index if index is not None else out, out,
            heads, dim, *fresh.keys.stride()[1:3], *before.keys.stride()[1:3],
            HAS_INDEX=index is not None,
            BH=triton.next_power_of_2(heads), BD=triton.next_power_of_2(dim),
        )  # fmt: skip
        return out

    def weighted_delta(self, deltas: Tensor, scales: Tensor, index: Tensor, w: Tensor) -> Tensor:
        n, k = index.shape
        width = deltas.shape[1]
        out = deltas.new_empty(n, width, dtype=torch.float32)
        if n == 0 or k == 0:
            return out.zero_()
        if deltas.stride(1) != 1:
            deltas = deltas.contiguous()
        bf = 1024
        _weighted_kernel[(n, triton.cdiv(width, bf))](
            deltas, scales.float().contiguous(), index.contiguous(), w.float().contiguous(),
            out, width, k, deltas.stride(0), BF=bf,
        )  # fmt: skip
        return out


def _gain_pair(gains: tuple[float | torch.Tensor, ...], like: torch.Tensor) -> torch.Tensor:
    """(gk, gv), floats or 0-dim device tensors, as two float32 values on the device."""
    dev = like.device
    parts = [
        g.reshape(1).float() if isinstance(g, torch.Tensor) else torch.full((1,), g) for g in gains
    ]
    return torch.cat([p.to(dev) for p in parts])


def _same_layout(dst: KV, src: KV | None, offsets: KV | None, parts: list[Tensor]) -> bool:
    """Keys and values of each KV share strides, head dims are innermost and even."""
    kvs = [kv for kv in (dst, src, offsets) if kv is not None]
    same = all(kv.keys.stride() == kv.values.stride() for kv in kvs)
    dev = {t.device for t in parts}
    return same and _inner_contiguous(*parts) and dst.keys.shape[-1] % 2 == 0 and len(dev) == 1


def _static_inv_freq(rotary: nn.Module) -> Tensor | None:
    """The rotary embedding's inverse frequencies [D/2] (float32) when they are static: the
    default, linear, llama3 and yarn variants (yarn's attention scaling is divided out of a
    re-rotation anyway); None for dynamic variants, whose frequencies change per call."""
    inv = getattr(rotary, "inv_freq", None)
    rope_type = str(getattr(rotary, "rope_type", "default"))
    if inv is None or "dynamic" in rope_type or "longrope" in rope_type:
        return None
    return inv.float()
