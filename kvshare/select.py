"""Choosing which tokens to recompute (CacheBlend-style deviation scoring, done right)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from kvshare.config import EngineConfig
from kvshare.kernels import KV, probe_layers
from kvshare.relocate import Assembly


def sink_mask(asm: Assembly, k: int) -> Tensor:
    """[S] bool: the first ``k`` tokens of every relocated run (attention-sink outliers)."""
    mask = torch.zeros_like(asm.relocated)
    for run in asm.runs:
        mask[run.start : run.start + k] = True
    return mask


def recent_mask(asm: Assembly, k: int) -> Tensor:
    """[S] bool: the last ``k`` relocated tokens (the next token attends to them most)."""
    mask = torch.zeros_like(asm.relocated)
    mask[asm.relocated.nonzero().flatten()[-k:]] = True
    return mask


def score_deviation(fresh: KV, reused: KV) -> Tensor:
    """Per-token relative deviation of reused KV from fresh KV at one layer.

    fresh, reused: KV [1, H, N, D] (one layer). Returns [N]: ‖ΔK‖/‖K‖ + ‖ΔV‖/‖V‖.
    """

    def rel(a: Tensor, b: Tensor) -> Tensor:
        diff = (a - b).pow(2).sum(dim=(0, 1, 3)).sqrt()
        return diff / a.pow(2).sum(dim=(0, 1, 3)).sqrt().clamp_min(1e-6)

    return rel(fresh.keys, reused.keys) + rel(fresh.values, reused.values)


def _layer(kv: KV, layer: int, index: Tensor) -> KV:
    return KV(kv.keys[layer : layer + 1, :, index], kv.values[layer : layer + 1, :, index])


def top_deviation(
    model: nn.Module,
    asm: Assembly,
    ids: Tensor,
    positions: Tensor,
    forced: Tensor,
    budget: int,
    check_layers: tuple[int, ...],
    uncertain: Tensor | None = None,
    threshold: float | None = None,
) -> Tensor:
    """Indices [<= budget] of relocated, not forced tokens with the largest KV deviation.

    Gradual filtering: every check layer but the last keeps twice the budget; each probe is a
    masked forward of (forced + candidates) through the layers up to that check layer against
    the reused cache, with an exact causal mask by true positions. ``uncertain`` ([M] indices,
    most uncertain first) joins the shortlist of the last check layer: an early layer misses
    deviations that only build up deeper (text quoted twice, say), the anchors' uncertainty
    does not. With ``threshold``, every token of the last shortlist whose deviation exceeds it
    is kept too (the budget grows where the reused KV is visibly wrong); earlier layers then
    keep at least a fifth of the candidates, so the last one has something to choose from.
    """
    n_layers = asm.cache.keys.shape[0]
    check_layers = tuple(sorted({min(c, n_layers - 1) for c in check_layers}))
    cand = (asm.relocated & ~forced).nonzero().flatten()
    if budget <= 0 or cand.numel() == 0:
        return cand[:0]
    wide = 2 * budget if threshold is None else max(2 * budget, round(0.2 * cand.numel()))
    for i, layer in enumerate(check_layers):
        last = i == len(check_layers) - 1
        keep = budget if last else wide
        if last and uncertain is not None and len(check_layers) > 1:
            extra = uncertain[~forced[uncertain] & asm.relocated[uncertain]][:budget]
            cand = torch.unique(torch.cat([cand, extra]))
        if cand.numel() <= keep and not last:
            continue
        sel = torch.unique(torch.cat([forced.nonzero().flatten(), cand]))
        fresh = probe_layers(model, asm.cache, ids, positions, sel, layer + 1)
        where = torch.searchsorted(sel, cand)
        dev = score_deviation(_layer(fresh, layer, where), _layer(asm.cache, layer, cand))
        if last and threshold is not None:
            keep = max(keep, int((dev > threshold).sum()))
        cand = cand[dev.topk(min(keep, cand.numel())).indices.sort().values]
    return cand


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


def choose(
    config: EngineConfig,
    model: nn.Module,
    asm: Assembly,
    ids: Tensor,
    pos: Tensor,
    estimates: list,
    ratio: float,
) -> Tensor:
    """[N] indices to (re)compute for ``config.mode``.

    Always: tokens never seen and the last prompt token. ``blend``/``kvshare``: plus the first
    ``sink_tokens`` of every run and the top ``ratio`` of relocated tokens by check-layer
    deviation (measured on ``asm.cache``, i.e. after anchor offsets in ``kvshare``).
    ``anchor``: everything when KVCOMM's entropy rule says the anchors are not trusted.
    """
    forced = asm.fresh
    forced[-1] = True
    mode = config.mode
    if mode == "anchor" and anchor_fallback(estimates, config.anchor_gamma, config.neighbours):
        forced[:] = True
    elif mode in ("blend", "kvshare") and asm.runs:
        forced |= sink_mask(asm, config.sink_tokens) & asm.relocated
        if mode == "kvshare" and config.recent_tokens:
            forced |= recent_mask(asm, config.recent_tokens)
        budget = round(ratio * int(asm.relocated.sum()))
        unc = uncertainty_order(estimates) if mode == "kvshare" and estimates else None
        thr = config.deviation_threshold if mode == "kvshare" else None
        top = top_deviation(model, asm, ids, pos, forced, budget, config.check_layers, unc, thr)
        forced[top] = True
    forced[: asm.prefix] = False
    return forced.nonzero().flatten()
