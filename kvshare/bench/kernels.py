"""``kvshare bench kernels``: every kernel op of the registry against its torch reference.

Shapes are a Llama-3-8B layer stack (32 layers, 8 KV heads, head dim 128) in bf16 unless
told otherwise; runs of 256–8K tokens. Reported per op and length: the torch chain's and the
fused kernel's median time, the speed-up, achieved bandwidth (bytes the op must move / time)
and its share of the device's peak, and the fused result's largest error relative to the
reference. Without a GPU only the torch reference is timed; the fused columns say "not
measured" (Triton's CPU interpreter is a correctness tool, not a speed).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from pydantic import BaseModel
from torch import Tensor

from kvshare.engine.profile import synchronize
from kvshare.kernels import KV, KernelOps, Move, TorchOps, kernels_for
from kvshare.model.adapter import ModelAdapter
from kvshare.model.random import PREFIX, random_config

# HBM peak (bytes/s) by device name; a device not listed reports no peak share.
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100": 2.0e12}


class KernelRow(BaseModel):
    """One op at one run length (times: medians in milliseconds)."""

    op: str
    tokens: int
    torch_ms: float
    fused_ms: float | None
    speedup: float | None
    torch_gbps: float
    fused_gbps: float | None
    peak_share: float | None
    max_rel_err: float | None
    backend: str


@dataclass(frozen=True)
class Shape:
    layers: int = 32
    heads: int = 8
    dim: int = 128
    dtype: torch.dtype = torch.bfloat16


def _median_s(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()  # warm-up (compiles a Triton kernel on first use)
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _rel_err(a: Tensor, b: Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def _cases(
    shape: Shape, n: int, device: torch.device, rotary: torch.nn.Module
) -> dict[str, tuple[Callable[[KernelOps], Tensor], int]]:
    """op name -> (run it with a backend and return its output, bytes it must move)."""
    g = torch.Generator().manual_seed(n)
    size = shape.dtype.itemsize
    dims = (shape.layers, shape.heads)

    def rand(*s: int, dtype: torch.dtype = shape.dtype) -> Tensor:
        return torch.randn(*s, generator=g).to(device, dtype)

    src = KV(rand(*dims, n + 64, shape.dim), rand(*dims, n + 64, shape.dim))
    dst = KV(rand(*dims, n + 512, shape.dim), rand(*dims, n + 512, shape.dim))
    off = KV(rand(*dims, n, shape.dim, dtype=torch.float32), rand(*dims, n, shape.dim))
    kv_bytes = 2 * shape.layers * shape.heads * n * shape.dim * size

    def relocate(ops: KernelOps) -> Tensor:
        ops.relocate(dst, Move(512, n, src, 64), rotary)
        return dst.keys[:, :, 512:]

    def relocate_offsets(ops: KernelOps) -> Tensor:
        ops.relocate(dst, Move(512, n, src, 64, off, (0.5, 0.5)), rotary)
        return dst.keys[:, :, 512:]

    fresh = KV(rand(1, shape.heads, n, shape.dim), rand(1, shape.heads, n, shape.dim))
    before = KV(rand(1, shape.heads, n, shape.dim), rand(1, shape.heads, n, shape.dim))
    cand = torch.arange(0, n, device=device)

    def deviation(ops: KernelOps) -> Tensor:
        return ops.deviation_topk(fresh, before, cand, max(1, n // 7))[0]

    m, k = min(n, 2048), 8
    width = shape.layers * 2 * shape.heads * shape.dim
    deltas = rand(m, width, dtype=torch.float16)
    index = torch.randint(0, m, (n, k), generator=g).to(device)
    w = torch.softmax(torch.randn(n, k, generator=g), 1).to(device)
    scales = torch.ones(m, device=device)

    def weighted(ops: KernelOps) -> Tensor:
        return ops.weighted_delta(deltas, scales, index, w)

    return {
        "relocate": (relocate, 2 * kv_bytes),
        "relocate+offsets": (relocate_offsets, 2 * kv_bytes + kv_bytes * 4 // size),
        "deviation+topk": (deviation, 4 * shape.heads * n * shape.dim * size),
        "weighted Δ": (weighted, n * k * width * 2 + n * width * 4),
    }


def _peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for key, v in PEAK_BANDWIDTH.items() if key in name), None)


def measure(
    lengths: list[int],
    device: torch.device,
    shape: Shape | None = None,
    repeats: int = 5,
    progress: Callable[[str], None] | None = None,
    fused: KernelOps | None = None,
) -> list[KernelRow]:
    """Time every op at every run length with the torch reference and ``fused`` (default:
    the registry's backend on CUDA, none elsewhere), and check it against the reference."""
    shape = shape or Shape()
    rotary = ModelAdapter.rotary_of(random_config(PREFIX + "llama-8b")).to(device)
    if fused is None and device.type == "cuda":
        fused = kernels_for(device)
    if fused is not None and fused.name == "torch":
        fused = None
    peak, ref, rows = _peak(device), TorchOps(), []
    for n in lengths:
        for op, (run, nbytes) in _cases(shape, n, device, rotary).items():
            if progress is not None:
                progress(f"{op} @ {n}")
            t_ref = _median_s(partial(run, ref), device, repeats)
            t_fused = err = None
            if fused is not None:
                got = run(fused).clone()  # ops write in place: keep the fused result
                err = _rel_err(got, run(ref))
                t_fused = _median_s(partial(run, fused), device, repeats)
            rows.append(_row(op, n, t_ref, t_fused, nbytes, peak, err, fused))
    return rows


def _row(
    op: str,
    n: int,
    t_ref: float,
    t_fused: float | None,
    nbytes: int,
    peak: float | None,
    err: float | None,
    fused: KernelOps | None,
) -> KernelRow:
    gbps = None if t_fused is None else nbytes / t_fused / 1e9
    return KernelRow(
        op=op,
        tokens=n,
        torch_ms=1e3 * t_ref,
        fused_ms=None if t_fused is None else 1e3 * t_fused,
        speedup=None if t_fused is None else t_ref / t_fused,
        torch_gbps=nbytes / t_ref / 1e9,
        fused_gbps=gbps,
        peak_share=None if gbps is None or peak is None else gbps * 1e9 / peak,
        max_rel_err=err,
        backend="none" if fused is None else fused.name,
    )


def markdown(rows: list[KernelRow], device: str) -> str:
    nm = "not measured"
    lines = [
        f"device: {device}\n",
        "| op | tokens | torch ms | fused ms | speed-up | torch GB/s | fused GB/s | "
        "of peak | max rel err |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fused = nm if r.fused_ms is None else f"{r.fused_ms:.3f}"
        sp = nm if r.speedup is None else f"{r.speedup:.2f}×"
        fg = nm if r.fused_gbps is None else f"{r.fused_gbps:.0f}"
        pk = nm if r.peak_share is None else f"{r.peak_share:.0%}"
        er = nm if r.max_rel_err is None else f"{r.max_rel_err:.1e}"
        lines.append(
            f"| {r.op} | {r.tokens} | {r.torch_ms:.3f} | {fused} | {sp} | "
            f"{r.torch_gbps:.1f} | {fg} | {pk} | {er} |"
        )
    return "\n".join(lines)
