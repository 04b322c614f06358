"""Choosing which tokens to recompute (CacheBlend-style deviation scoring, done right)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from kvshare.engine.relocate import Assembly
from kvshare.kernels import KV, KernelOps, TorchOps


def forced_runs(asm: Assembly, sinks: int, recent: int, last: bool = False) -> np.ndarray:
    """[S] bool on the host, from the runs alone (no device read): the first ``sinks``
    tokens of every relocated run (attention-sink outliers), the last ``recent`` relocated
    tokens (the next token attends to them most) and, with ``last``, the last prompt token
    if it is relocated."""
    n = asm.relocated.shape[0]
    relocated = np.zeros(n, dtype=bool)
    mask = np.zeros(n, dtype=bool)
    for run in asm.runs:
        relocated[run.start : run.end] = True
        mask[run.start : run.start + sinks] = True
    mask &= relocated
    if recent > 0:
        mask[np.flatnonzero(relocated)[-recent:]] = True
    if last and relocated[n - 1]:
        mask[n - 1] = True
    return mask


@dataclass(frozen=True)
class DeviationFilter:
    """The narrowing rule of a gradual prefill (``kernels.gradual_prefill``).

    At every check layer but the last: keep ``forced`` tokens, ``protect``-ed tokens and the
    ``wide`` candidates with the largest deviation (fresh vs reused KV of that layer). At the
    last check layer: ``forced`` plus the ``budget`` largest, or with ``threshold`` every
    candidate whose deviation exceeds it if there are more. forced, protect: [S] bool.

    ``protect`` carries the anchors' most uncertain tokens to the last check: an early layer
    misses deviations that only build up deeper (text quoted twice, say), the anchors'
    uncertainty does not.
    """

    forced: Tensor
    protect: Tensor
    budget: int
    wide: int
    last_layer: int
    threshold: float | None = None
    ops: KernelOps = field(default_factory=TorchOps)
    n_forced: int | None = None  # forced tokens in every ``sel`` (host); None: counted

    def __call__(self, layer: int, sel: Tensor, fresh: KV, before: KV) -> Tensor:
        """keep [N] bool over ``sel`` [N]. Scores every token of ``sel`` (forced ones masked
        out) and takes a top-k whose size is known on the host: no device read, except the
        threshold's count at the last check layer."""
        last = layer >= self.last_layer
        forced = self.forced[sel]
        keep = forced.clone()
        n_forced = self.n_forced if self.n_forced is not None else int(forced.sum())
        free = sel.numel() - n_forced
        if not last:
            keep |= self.protect[sel]
        if free <= 0:
            return keep
        n = self.budget if last else self.wide
        scores = self.ops.deviation(fresh, before).masked_fill(forced, float("-inf"))
        if last and self.threshold is not None:
            n = max(n, int((scores > self.threshold).sum()))
        return keep.index_fill(0, scores.topk(min(n, free)).indices, True)


def deviation_filter(
    asm: Assembly,
    forced: Tensor,
    budget: int,
    n_cand: int,
    check_layers: tuple[int, ...],
    uncertain: Tensor | None = None,
    threshold: float | None = None,
) -> tuple[tuple[int, ...], DeviationFilter]:
    """Check layers (clamped below the last model layer) and the filter for a gradual prefill.

    Every check layer but the last keeps twice the budget; with ``threshold`` at least a fifth
    of the candidates, so the last one has something to choose from. ``uncertain`` ([M]
    indices, most uncertain first): its first ``budget`` relocated, not forced tokens are
    protected up to the last check layer. ``n_cand``: the number of relocated, not forced
    tokens (known on the host from the runs: ``forced_runs``).
    """
    top = max(0, asm.cache.keys.shape[0] - 2)
    checks = tuple(sorted({min(c, top) for c in check_layers}))
    wide = 2 * budget if threshold is None else max(2 * budget, round(0.2 * n_cand))
    protect = torch.zeros_like(forced)
    if uncertain is not None and len(checks) > 1:
        free = ~forced[uncertain] & asm.relocated[uncertain]
        first = free & (free.cumsum(0) <= budget)  # the first `budget` free ones, in order
        protect.scatter_(0, uncertain, first)
    n_forced = asm.relocated.shape[0] - asm.prefix - n_cand  # of every token after the prefix
    narrow = DeviationFilter(
        forced, protect, budget, wide, checks[-1], threshold, asm.ops, n_forced=n_forced
    )
    return checks, narrow


def uncertainty_order(estimates: list) -> Tensor:
    """Positions [M] of every run token, most uncertain anchor estimate first.

    Uncertainty: nearest-anchor distance in τ (infinite for a context never seen), ties
    broken toward later positions, which weigh most on the next token.
    """
    pos = torch.cat([e.positions for e in estimates])
    dist = torch.cat([e.estimate.distance.to(pos.device) for e in estimates])
    late = pos.argsort(descending=True, stable=True)
    by_dist = dist[late].nan_to_num(posinf=1e6).argsort(descending=True, stable=True)
    return pos[late][by_dist]


def anchor_fallback(estimates: list, gamma: float, neighbours: int) -> bool:
    """KVCOMM's rule: dense prefill when any run has no anchors or its mean weight entropy
    exceeds ``gamma * log(#neighbours)``."""
    limit = gamma * math.log(max(neighbours, 2))
    for e in estimates:
        ent = e.estimate.entropy
        if not torch.isfinite(ent).all() or float(ent.mean()) > limit:
            return True
    return False


class Plan(NamedTuple):
    """Tokens to compute [N] and, for a gradual prefill, its check layers and filter.
    ``tail``: set when the tokens are exactly ``[tail, S)``, known on the host (an ordinary
    causal prefill then runs, with no mask and no device read)."""

    sel: Tensor
    checks: tuple[int, ...] = ()
    narrow: DeviationFilter | None = None
    tail: int | None = None
