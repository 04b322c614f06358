"""Anchor offsets for relocated runs: context keys, estimation, application, learning."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from kvshare.anchors import AnchorPool, Estimate, position_free, token_features
from kvshare.engine.relocate import Assembly, Run, relocated_kv
from kvshare.kernels import KV, KernelOps, Move, Narrow, TorchOps, slice_tokens, to_device
from kvshare.model.prompt import Prompt


@dataclass(frozen=True)
class RunEstimate:
    """One relocated run: its context key, features [n, F], target positions [n], estimate."""

    run: Run
    key: str
    feats: Tensor
    positions: Tensor
    estimate: Estimate


def context_key(run: Run, prompt: Prompt, agent: str | None) -> str:
    """``[source agent, slot, target agent, slot]`` as JSON (the deviation depends on both
    ends; JSON keeps agent names containing separators from colliding)."""
    slot = next((f"m{s.index}" for s in prompt.segments if s.start <= run.start < s.end), "tail")
    return json.dumps([run.segment.agent, run.segment.slot_at(run.offset), agent, slot])


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
        est = pool.estimate(key, feats, (layers, 2, heads, dim), count_hits=False)
        pos = torch.arange(run.start, run.end, device=asm.cache.keys.device)
        out.append(RunEstimate(run, key, feats, pos, est))
    return out


def commit_hits(pool: AnchorPool, estimates: list[RunEstimate]) -> None:
    """Count the anchors every estimate used (deferred until the call is known good)."""
    for e in estimates:
        pool.count_hits(e.key, e.estimate.anchor_ids)


def trusted_delta(
    e: RunEstimate, layers: slice, max_distance: float, like: Tensor, may_skip: bool = False
) -> KV | None:
    """The run's position-free offsets for ``layers``: KV [L', H, n, D] (dtype and device of
    ``like``); with ``may_skip``, None when no token of the run is trusted.

    Tokens whose nearest anchor is farther than ``max_distance`` (in τ) get no offset (zero):
    an estimate that far away is not trusted. Knowing that a whole run is untrusted takes a
    host read of its distances: ``may_skip`` where a read is free (the compacting path, the
    CPU), saving the offsets' arithmetic; with fixed shapes the run is masked instead.
    """
    trusted = e.estimate.distance <= max_distance
    if may_skip and not bool(trusted.any()):
        return None
    d = e.estimate.delta[layers].to(like.device, like.dtype) * trusted.to(like.device)[:, None]
    return KV(d[:, 0], d[:, 1])


def apply_estimates(
    cache: KV,
    estimates: list[RunEstimate],
    rotary: nn.Module,
    max_distance: float,
    gains: list[tuple[float, float]] | None = None,
    ops: KernelOps | None = None,
    may_skip: bool = False,
) -> None:
    """Add every run's offsets to ``cache`` [L, H, S, D] in place, keys re-rotated to the
    target positions, scaled by the run's (K, V) ``gains`` (default 1); one ``ops.relocate``
    per run."""
    ops = ops or TorchOps()
    for i, e in enumerate(estimates):
        delta = trusted_delta(e, slice(None), max_distance, cache.keys, may_skip)
        if delta is None:
            continue
        gain = gains[i] if gains is not None else (1.0, 1.0)
        ops.relocate(cache, Move(e.run.start, e.run.length, offsets=delta, gains=gain), rotary)


def fit_gain(true: Tensor, estimate: Tensor) -> float:
    """The scale g in [0, 1] that brings ``g·estimate`` closest (L2) to ``true`` (same shape):
    1 when the estimate is right, 0 when it points nowhere useful (or is zero)."""
    one_run = torch.zeros(true.numel(), dtype=torch.long, device=true.device)
    flat = (true.reshape(1, 1, -1, 1), estimate.reshape(1, 1, -1, 1))
    return float(run_gains(*flat, one_run, 1)[0].nan_to_num(0.0))


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


@dataclass
class ValidatedOffsets:
    """A gradual-prefill ``Narrow`` that applies anchor offsets only as far as they hold up.

    At the first check layer c every relocated token has just been computed fresh, so the
    anchors' estimate for layer c can be checked against the truth before it touches any
    layer the prefill will not recompute. Per run, the (K, V) gains in [0, 1] that bring the
    estimate closest to the fresh KV (``fit_gain``) scale the offsets of layer c (so that
    ``inner`` scores the deviation left after them) and of every layer above c in ``cache``
    [L, H, S, D] (the KV that dropped tokens keep), in place. ``record(key, gk, gv)`` gets the
    fitted gains. KVCOMM trusts an estimate when its anchor weights are peaked; this trusts
    it when it measurably moves the KV toward the truth.
    """

    inner: Narrow
    estimates: list[RunEstimate]
    cache: KV
    rotary: nn.Module
    max_distance: float
    first: int
    record: Callable[[str, Tensor, Tensor], None] | None = None
    ops: KernelOps = field(default_factory=TorchOps)
    may_skip: bool = False  # untrusted runs skipped after a host read (``trusted_delta``)

    def __call__(self, layer: int, sel: Tensor, fresh: KV, before: KV) -> Tensor:
        if layer == self.first:
            before = self._fit(layer, sel, fresh, before)
        return self.inner(layer, sel, fresh, before)

    def _fit(self, layer: int, sel: Tensor, fresh: KV, before: KV) -> KV:
        """fresh, before: KV [1, H, N, D] of ``sel`` [N]; returns ``before`` plus offsets.

        Every run at once, reading nothing on the host: layer c's offsets are gathered at
        ``sel`` (:meth:`_layer_offsets`), and each run's gains are sums over its tokens
        (:func:`run_gains`). ``record`` gets 0-dim tensors, NaN for a run none of whose tokens
        carried an offset (nothing to fit).
        """
        est, rid = self._layer_offsets(layer, sel, before)
        n = len(self.estimates)
        gk = run_gains(fresh.keys - before.keys, est.keys, rid, n)
        gv = run_gains(fresh.values - before.values, est.values, rid, n)
        keys = before.keys + _per_token(gk, rid).to(est.keys) * est.keys
        values = before.values + _per_token(gv, rid).to(est.values) * est.values
        above = KV(self.cache.keys[layer + 1 :], self.cache.values[layer + 1 :])
        skip = self.may_skip
        for r, e in enumerate(self.estimates):
            d = trusted_delta(e, slice(layer + 1, None), self.max_distance, before.keys, skip)
            if above.keys.shape[0] and d is not None:
                g = (gk[r].nan_to_num(0.0), gv[r].nan_to_num(0.0))
                move = Move(e.run.start, e.run.length, offsets=d, gains=g)
                self.ops.relocate(above, move, self.rotary)
            if self.record is not None:
                self.record(e.key, gk[r], gv[r])
        return KV(keys, values)

    def _layer_offsets(self, layer: int, sel: Tensor, like: KV) -> tuple[KV, Tensor]:
        """Layer ``layer``'s offsets of every run at ``sel``: KV [1, H, N, D] (zero outside
        the runs), and the run index of each token [N] (``len(estimates)``: in no run)."""
        slots = self.cache.keys.shape[2]
        _, heads, _, dim = like.keys.shape
        buf = KV(*(t.new_zeros(1, heads, slots, dim) for t in (like.keys, like.values)))
        run_of = np.full(slots, len(self.estimates), dtype=np.int64)
        skip = self.may_skip
        for r, e in enumerate(self.estimates):
            d = trusted_delta(e, slice(layer, layer + 1), self.max_distance, like.keys, skip)
            if d is not None:
                self.ops.relocate(buf, Move(e.run.start, e.run.length, offsets=d), self.rotary)
            run_of[e.run.start : e.run.end] = r
        return KV(buf.keys[:, :, sel], buf.values[:, :, sel]), to_device(run_of, sel)[sel]


def _per_token(gains: Tensor, rid: Tensor) -> Tensor:
    """[R] run gains (NaN: none) -> [1, 1, N, 1] per token (0 outside the runs)."""
    padded = torch.cat([gains.nan_to_num(0.0), gains.new_zeros(1)])
    return padded[rid][None, None, :, None]


def run_gains(true: Tensor, estimate: Tensor, rid: Tensor, runs: int) -> Tensor:
    """:func:`fit_gain` per run, on the device: [runs] float32 gains in [0, 1], NaN for a run
    whose estimate is zero on every token it has. true, estimate: [1, H, N, D]; rid: [N]
    run index per token (``runs``: in no run)."""
    zeros = torch.zeros(runs + 1, device=true.device)
    num = zeros.index_add(0, rid, (true.float() * estimate.float()).sum((0, 1, 3)))
    den = zeros.index_add(0, rid, estimate.float().pow(2).sum((0, 1, 3)))
    gains = (num / den.clamp_min(1e-30)).clamp(0.0, 1.0)
    return torch.where(den > 0, gains, torch.full_like(gains, float("nan")))[:runs]
