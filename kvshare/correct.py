"""Anchor offsets for relocated runs: context keys, estimation, application, learning."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kvshare.anchors import AnchorPool, Estimate, at_positions, position_free, token_features
from kvshare.kernels import KV, slice_tokens
from kvshare.prompt import Prompt
from kvshare.relocate import Assembly, Run, relocated_kv


@dataclass(frozen=True)
class RunEstimate:
    """One relocated run: its context key, features [n, F], target positions [n], estimate."""

    run: Run
    key: str
    feats: Tensor
    positions: Tensor
    estimate: Estimate


def context_key(run: Run, prompt: Prompt, agent: str | None) -> str:
    """``source agent:slot -> target agent:slot`` (the deviation depends on both ends)."""
    slot = next((f"m{s.index}" for s in prompt.segments if s.start <= run.start < s.end), "tail")
    return f"{run.segment.agent}:{run.segment.slot_at(run.offset)}->{agent}:{slot}"


def _features(run: Run, rotary: nn.Module, layer: int) -> Tensor:
    base = slice_tokens(run.segment.kv, run.offset, run.offset + run.length)
    canonical = torch.arange(run.offset, run.offset + run.length, device=base.keys.device)
    return token_features(base, canonical, rotary, layer)


def estimate_runs(
    pool: AnchorPool,
    asm: Assembly,
    prompt: Prompt,
    agent: str | None,
    rotary: nn.Module,
    feature_layer: int,
) -> list[RunEstimate]:
    """Anchor estimates for every relocated run of ``asm``."""
    layers, heads, _, dim = asm.cache.keys.shape
    out = []
    for run in asm.runs:
        key = context_key(run, prompt, agent)
        feats = _features(run, rotary, feature_layer)
        est = pool.estimate(key, feats, (layers, 2, heads, dim))
        pos = torch.arange(run.start, run.end, device=asm.cache.keys.device)
        out.append(RunEstimate(run, key, feats, pos, est))
    return out


def apply_estimates(
    cache: KV, estimates: list[RunEstimate], rotary: nn.Module, max_distance: float
) -> None:
    """Add every run's offsets to ``cache`` [L, H, S, D] in place, keys re-rotated to the
    target positions.

    Tokens whose nearest anchor is farther than ``max_distance`` (in τ) keep their plain
    relocated KV: an estimate that far away is not trusted.
    """
    for e in estimates:
        trusted = (e.estimate.distance <= max_distance).to(cache.keys.device)
        if not trusted.any():
            continue
        d = e.estimate.delta.to(cache.keys.dtype).to(cache.keys.device) * trusted[:, None]
        moved = at_positions(KV(d[:, 0], d[:, 1]), e.positions, rotary)  # [L, H, n, D]
        cache.keys[:, :, e.run.start : e.run.end] += moved.keys
        cache.values[:, :, e.run.start : e.run.end] += moved.values


def learn(
    pool: AnchorPool,
    estimates: list[RunEstimate],
    true_kv: KV,
    known: Tensor,
    rotary: nn.Module,
) -> int:
    """Admit Δ = true − relocated for run tokens whose true KV is ``known`` ([S] bool).

    The relocated KV is rebuilt from the stored segment (the call's own cache was corrected
    and overwritten in place). Returns the number of anchor tokens admitted.
    """
    added = 0
    for e in estimates:
        local = known[e.run.start : e.run.end].nonzero().flatten()
        if local.numel() == 0:
            continue
        base = relocated_kv(e.run, rotary)
        idx = local + e.run.start
        delta = KV(
            true_kv.keys[:, :, idx] - base.keys[:, :, local].to(true_kv.keys),
            true_kv.values[:, :, idx] - base.values[:, :, local].to(true_kv.values),
        )
        free = position_free(delta, e.positions[local], rotary)
        added += pool.add(e.key, e.feats[local], torch.stack([free.keys, free.values], 1))
    return added
