"""The torch reference of every kernel op (and the backend on CPU)."""

from __future__ import annotations

import torch
from kvshare.kernels.kv import KV
from kvshare.kernels.ops import KernelOps, Move
from kvshare.kernels.rope import shift_rope
from torch import Tensor, nn


def _rel(a: Tensor, b: Tensor) -> Tensor:
    """‖a − b‖ / ‖a‖ per token over (batch, heads, dims). a, b: [1, H, N, D] -> [N]."""
    a, b = a.float(), b.float()
    diff = (a - b).pow(2).sum(dim=(0, 1, 3)).sqrt()
    return diff / a.pow(2).sum(dim=(0, 1, 3)).sqrt().clamp_min(1e-6)


class TorchOps(KernelOps):
    """Plain torch: a chain of slices, rotations, casts and copies (several launches per op)."""

    name = "torch"

    def relocate(self, dst: KV, move: Move, rotary: nn.Module) -> None:
        at, n, src, start = move.at, move.n, move.src, move.src_start
        keys, values = dst.keys[:, :, at : at + n], dst.values[:, :, at : at + n]
        if src is not None:
            part_k = src.keys[:, :, start : start + n].to(keys.device)
            delta = torch.full((n,), at - start, dtype=torch.long)
            keys.copy_(shift_rope(part_k, delta, rotary) if at != start else part_k)
            values.copy_(src.values[:, :, start : start + n])
        if move.offsets is not None:
            pos = torch.arange(at, at + n, device=keys.device)
            off_k = shift_rope(move.offsets.keys.to(keys), pos, rotary)
            gk, gv = move.gains  # floats or 0-dim device tensors
            keys.add_(off_k * gk)
            values.add_(move.offsets.values.to(values) * gv)

    def deviation(self, fresh: KV, before: KV, index: Tensor | None = None) -> Tensor:
        if index is not None:
            fresh = KV(fresh.keys[:, :, index], fresh.values[:, :, index])
            before = KV(before.keys[:, :, index], before.values[:, :, index])
        return _rel(fresh.keys, before.keys) + _rel(fresh.values, before.values)

    def weighted_delta(
        self, deltas: Tensor, scales: Tensor, index: Tensor, w: Tensor, chunk: int = 16
    ) -> Tensor:
        """A few rows at a time: their [rows, k, F] neighbours are decoded once and reduced
        with one batched matmul while still in cache (a loop over neighbour ranks would
        stream the whole [N, F] accumulator k times)."""
        n, k = index.shape
        out = torch.empty(n, deltas.shape[1], device=deltas.device)
        for s in range(0, n, chunk):
            rows = index[s : s + chunk].flatten()
            nb = deltas[rows].float()
            if deltas.dtype is torch.int8:
                nb = nb * scales[rows, None]
            out[s : s + chunk] = torch.bmm(w[s : s + chunk, None, :], nb.view(-1, k, nb.shape[1]))[
                :, 0
            ]
        return out
