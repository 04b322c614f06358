"""Shared-prefix attention for batched decoding (the Hydragen / BatchLLM idea).

Calls that start with the same long prefix (parallel branches over one document, agents
over one system prompt and tool block) hold that prefix's KV once, as a
:class:`SharedPrefix` referenced by every row that starts with it (refcounted, no copy: the
parts are the prefix cache's own tensors). A decode step attends to it in one matrix
product for all of them — the rows' queries stacked as one block of queries against the
prefix's keys, so the prefix is read once per step instead of once per row — and each row
attends to its own suffix on its own; the two partial attentions are merged exactly by
their log-sum-exp (:func:`merge`).

Shapes: n rows, H kv heads, R query heads per kv head (grouped-query attention), P prefix
tokens, S suffix slots, D head dim. Scores, log-sum-exps and softmax weights are float32
whatever the KV's dtype.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import torch
from torch import Tensor

from kvshare.kernels.kv import KV

# A prefix to share: its identity (the same key always means the same KV) and its parts, each
# KV [L, H, P_i, D] at positions that continue one another from 0.
ShareKey = tuple[Hashable, tuple[KV, ...]]


@dataclass(eq=False)
class SharedPrefix:
    """KV held once for every decode row that starts with it: ``parts`` [L, H, P_i, D] in
    order (positions ``0..length-1``); ``key``: its identity where it is held; ``refs``:
    rows using it."""

    parts: tuple[KV, ...]
    key: Hashable = None
    refs: int = 0

    @property
    def length(self) -> int:
        return sum(p.length for p in self.parts)

    @property
    def nbytes(self) -> int:
        return sum(2 * p.keys.numel() * p.keys.element_size() for p in self.parts)


def attend(
    q: Tensor, keys: Tensor, values: Tensor, scale: float, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Attention with its log-sum-exp. q [N, H, R, D]; keys/values [N, H, S, D]; mask
    [N, 1, 1, S] bool (True: attend) or None. Returns o [N, H, R, D] in q's dtype and lse
    [N, H, R] float32 (-inf where a row attends to nothing)."""
    s = torch.matmul(q, keys.transpose(-1, -2)).float() * scale  # [N, H, R, S]
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    w = torch.exp(s - lse.nan_to_num(neginf=0.0)[..., None])
    return torch.matmul(w.to(values.dtype), values), lse


def merge(o1: Tensor, lse1: Tensor, o2: Tensor, lse2: Tensor) -> tuple[Tensor, Tensor]:
    """Two attentions of the same queries over disjoint key sets, as one over their union:
    o [..., D], lse [...] (float32). Exact up to rounding."""
    lse = torch.logaddexp(lse1, lse2)
    w1 = torch.exp(lse1 - lse)[..., None]
    w2 = torch.exp(lse2 - lse)[..., None]
    return (o1.float() * w1 + o2.float() * w2).to(o1.dtype), lse


def prefix_attention(
    q: Tensor, prefix: SharedPrefix, layer: int, scale: float
) -> tuple[Tensor, Tensor]:
    """Attention of n rows' queries q [n, H, R, D] over ``prefix``'s layer ``layer``, the n
    rows stacked as one block of n·R queries per kv head (one product per part, the prefix
    read once). Returns o [n, H, R, D], lse [n, H, R]."""
    n, h, r, d = q.shape
    block = q.permute(1, 0, 2, 3).reshape(1, h, n * r, d)  # [1, H, n·R, D]
    o: Tensor | None = None
    lse = torch.empty(0)
    for part in prefix.parts:
        po, pl = attend(block, part.keys[layer][None], part.values[layer][None], scale)
        o, lse = (po, pl) if o is None else merge(o, lse, po, pl)
    assert o is not None, "a shared prefix has at least one part"
    return o.view(h, n, r, d).permute(1, 0, 2, 3), lse.view(h, n, r).permute(1, 0, 2)


def attend_rows(
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    scale: float,
    mask: Tensor | None,
    groups: list[tuple[SharedPrefix, Tensor]],
    layer: int,
) -> Tensor:
    """One layer's decode attention for B rows: each row over its own slots (keys/values
    [B, H, S, D], ``mask`` [B, 1, 1, S] or None) and, for the rows of each group (a prefix
    and its row indices [n] long), over that prefix too. q [B, Hq, 1, D] (Hq = H·R, query
    head h·R + r reads kv head h). Returns o [B, Hq, 1, D].

    One prefix under every row (the parallel-branches case): one softmax over the prefix's
    and the row's scores together (:func:`_one_group`); otherwise per-group attentions merged
    by log-sum-exp."""
    b, hq, _, d = q.shape
    h = keys.shape[1]
    qg = q.view(b, h, hq // h, d)
    if len(groups) == 1 and len(groups[0][1]) == b:
        return _one_group(qg, keys, values, scale, mask, groups[0][0], layer).reshape(b, hq, 1, d)
    o, lse = attend(qg, keys, values, scale, mask)
    for prefix, rows in groups:
        po, pl = prefix_attention(qg[rows], prefix, layer, scale)
        o[rows], lse[rows] = merge(o[rows], lse[rows], po, pl)
    return o.view(b, hq, 1, d)


def _one_group(
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    scale: float,
    mask: Tensor | None,
    prefix: SharedPrefix,
    layer: int,
) -> Tensor:
    """Every row of q [B, H, R, D] over ``prefix`` then its own keys [B, H, S, D]: the
    prefix's scores for all B·R queries in one product per part (the prefix read once), one
    softmax over [prefix | own] taken in place part by part (no concatenated copy). Returns
    o [B, H, R, D]."""
    b, h, r, d = q.shape
    block = q.permute(1, 0, 2, 3).reshape(h, b * r, d)  # [H, B·R, D]
    own = torch.matmul(q, keys.transpose(-1, -2)).float().mul_(scale)  # [B, H, R, S]
    if mask is not None:
        own = own.masked_fill(~mask, float("-inf"))
    own = own.permute(1, 0, 2, 3).reshape(h, b * r, -1)  # [H, B·R, S]
    heads = [
        torch.matmul(block, p.keys[layer].transpose(-1, -2)).float().mul_(scale)
        for p in prefix.parts
    ]  # [H, B·R, P_i]
    top = own.amax(-1, keepdim=True)
    for s in heads:
        top = torch.maximum(top, s.amax(-1, keepdim=True))
    total = own.sub_(top).exp_().sum(-1, keepdim=True)
    for s in heads:
        total += s.sub_(top).exp_().sum(-1, keepdim=True)
    mine = own.reshape(h, b, r, -1).to(values.dtype)
    o = torch.matmul(mine, values.transpose(0, 1)).view(h, b * r, d)  # [H, B·R, D]
    for s, p in zip(heads, prefix.parts, strict=True):
        o = torch.baddbmm(o, s.to(values.dtype), p.values[layer])
    o = (o.float() / total).to(values.dtype)
    return o.view(h, b, r, d).permute(1, 0, 2, 3)
