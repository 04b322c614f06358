"""Choosing which tokens to recompute (CacheBlend-style deviation scoring, done right)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from kvshare.engine.relocate import Assembly
from kvshare.kernels import KV, KernelOps, Sizes, TorchOps


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
    ``wide`` candidates (neither forced nor protected) with the largest deviation (fresh vs
    reused KV of that layer). At the last check layer: ``forced`` plus the ``budget``
    largest, or with ``threshold`` every candidate whose deviation exceeds it if there are
    more. forced, protect: [S] bool, disjoint; ``forced`` holds the last prompt token.

    ``protect`` carries the anchors' most uncertain tokens to the last check: an early layer
    misses deviations that only build up deeper (text quoted twice, say), the anchors'
    uncertainty does not.

    ``n_forced`` / ``n_protect``: how many forced / protected tokens every ``sel`` holds
    (known on the host from the plan; None: counted on the device, a host read each).
    With both, :meth:`kept` says how many tokens a check keeps without reading anything.
    ``above``: per last-check call, how many candidates exceeded the threshold (0-dim device
    tensors; the production signal that steers the recompute ratio, ``fidelity.steer_ratio``).
    """

    forced: Tensor
    protect: Tensor
    budget: int
    wide: int
    last_layer: int
    threshold: float | None = None
    ops: KernelOps = field(default_factory=TorchOps)
    n_forced: int | None = None
    n_protect: int | None = None
    above: list[Tensor] = field(default_factory=list, compare=False)  # see __call__

    def __call__(self, layer: int, sel: Tensor, fresh: KV, before: KV) -> Tensor:
        """keep [N] bool over ``sel`` [N]. Scores every token of ``sel`` (forced and, below
        the last check, protected ones masked out) and takes a top-k whose size is known on
        the host; the threshold adds every score above it (the ``max(budget, count above)``
        largest, without reading the count): no device read."""
        last = layer >= self.last_layer
        forced = self.forced[sel]
        shielded = forced if last else forced | self.protect[sel]
        free = sel.numel() - self._count(self.n_forced, forced)
        if not last:
            free -= self._count(self.n_protect, self.protect[sel])
        if free <= 0:
            return shielded.clone()
        n = self.budget if last else self.wide
        scores = self.ops.deviation(fresh, before).masked_fill(shielded, float("-inf"))
        keep = shielded.index_fill(0, scores.topk(min(n, free)).indices, True)
        if not last or self.threshold is None:
            return keep
        over = scores > self.threshold
        self.above.append(over.sum())  # 0-dim, read after the first token (ratio steering)
        return keep | over

    def kept(self, layer: int, n: int) -> int | None:
        """How many of ``n`` tokens the check at ``layer`` keeps, when that is known on the
        host: always below the last check layer, at the last one without a threshold (whose
        count depends on the deviations); None otherwise."""
        if self.n_forced is None or self.n_protect is None:
            return None
        last = layer >= self.last_layer
        if last and self.threshold is not None:
            return None
        shielded = self.n_forced + (0 if last else self.n_protect)
        return shielded + max(0, min(self.budget if last else self.wide, n - shielded))

    @staticmethod
    def _count(known: int | None, mask: Tensor) -> int:
        return known if known is not None else int(mask.sum())


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
    indices of every relocated token, most uncertain first): its first ``budget`` not forced
    tokens are protected up to the last check layer. ``n_cand``: the number of relocated, not forced
    tokens (known on the host from the runs: ``forced_runs``).
    """
    top = max(0, asm.cache.keys.shape[0] - 2)
    checks = tuple(sorted({min(c, top) for c in check_layers}))
    wide = 2 * budget if threshold is None else max(2 * budget, round(0.2 * n_cand))
    protect = torch.zeros_like(forced)
    protect_used = uncertain is not None and len(checks) > 1
    if uncertain is not None and protect_used:
        free = ~forced[uncertain] & asm.relocated[uncertain]
        first = free & (free.cumsum(0) <= budget)  # the first `budget` free ones, in order
        protect.scatter_(0, uncertain, first)
    n_forced = asm.relocated.shape[0] - asm.prefix - n_cand  # of every token after the prefix
    n_protect = min(budget, n_cand) if protect_used else 0  # ``uncertain``: every run token
    narrow = DeviationFilter(
        forced, protect, budget, wide, checks[-1], threshold, asm.ops, n_forced, n_protect
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

    @property
    def sizes(self) -> Sizes | None:
        """The narrowing's kept counts known on the host (``DeviationFilter.kept``)."""
        return self.narrow.kept if self.narrow is not None else None
