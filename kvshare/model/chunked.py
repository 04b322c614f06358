"""A chunk of one call's prefill, run inside a decode step (chunked prefill).

A decode step on a CPU reads every weight for a handful of tokens; a prefill chunk of C
tokens is compute-bound. Run in one forward — the decode tokens and the chunk's tokens
through the same projections and MLP, each attending to its own KV — the decodes ride on
the chunk's weight reads, and a long prompt advances C tokens a step instead of holding
every stream for its whole prefill. :class:`~kvshare.model.batched.BatchedDecoder` takes
one :class:`Chunk` per step; this module holds what is the chunk's own: its KV writes and
its causal attention.

A chunk's result does not depend on the decodes beside it beyond float rounding: the
projections are row-wise (one GEMM row per token; a BLAS may round a row differently with
the number of rows, as it already does for the decode batch) and its attention reads only
its own KV. Its boundaries are fixed by the call (``start`` advances by the budget from the
first computed token), whatever the load. Shapes: L layers,
H kv heads, Hq query heads, S prompt tokens, C chunk tokens, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kvshare.kernels.kv import KV


@dataclass
class Chunk:
    """Prompt tokens ``ids`` [C] at positions ``start + [0, C)`` of a call whose prompt KV is
    ``kv`` [L, H, S, D] (valid over ``[0, start)`` before the step; the step writes the
    chunk's K/V at ``[start, start + C)``). ``last``: the prompt's final chunk (the step
    returns its last token's logits)."""

    kv: KV
    ids: Tensor
    start: int
    last: bool

    @property
    def end(self) -> int:
        return self.start + int(self.ids.numel())

    def positions(self) -> Tensor:
        """[C] positions of the chunk's tokens."""
        return torch.arange(self.start, self.end, device=self.ids.device)


def write_kv(chunk: Chunk, layer: int, k: Tensor, v: Tensor) -> None:
    """Store the chunk's K/V of ``layer`` (k, v [1, H, C, D]) into its prompt KV."""
    chunk.kv.keys[layer, :, chunk.start : chunk.end] = k[0]
    chunk.kv.values[layer, :, chunk.start : chunk.end] = v[0]


def attention(chunk: Chunk, layer: int, q: Tensor, scale: float) -> Tensor:
    """Causal attention of the chunk's queries q [1, Hq, C, D] over the prompt's tokens
    ``[0, end)`` of ``layer`` (its K/V already written). Returns o [1, Hq, C, D]."""
    c, end = q.shape[2], chunk.end
    keys = chunk.kv.keys[layer, :, :end][None]  # [1, H, end, D]
    values = chunk.kv.values[layer, :, :end][None]
    at = torch.arange(end, device=q.device)
    mask = at[None, :] <= (chunk.start + torch.arange(c, device=q.device))[:, None]  # [C, end]
    return F.scaled_dot_product_attention(
        q, keys, values, attn_mask=mask, scale=scale, enable_gqa=True
    )


def bounds(first: int, total: int, budget: int) -> list[tuple[int, int]]:
    """The chunks ``[start, end)`` of a prefill of tokens ``[first, total)``, ``budget``
    tokens each (the last one shorter): fixed by the call, whatever the load."""
    if budget < 1:
        raise ValueError(f"chunk budget must be >= 1, got {budget}")
    return [(s, min(s + budget, total)) for s in range(first, total, budget)]
