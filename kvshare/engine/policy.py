"""Reuse policies: one class per mode, chosen through a registry (``full`` is the oracle).

A policy says what a mode reuses (exact prefix, relocated runs, anchor offsets), which tokens
it recomputes, and what it keeps and learns; the engine asks it instead of testing the mode's
name. Contract of ``choose``: the returned selection always contains every token without KV
(``asm.fresh``) and the last prompt token, and never a token of the exact prefix.
"""

from __future__ import annotations

from abc import ABC
from collections.abc import Callable
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from kvshare.anchors import AnchorPool
from kvshare.config import EngineConfig
from kvshare.engine.correct import RunEstimate, ValidatedOffsets, apply_estimates
from kvshare.engine.relocate import Assembly
from kvshare.engine.select import (
    Plan,
    anchor_fallback,
    deviation_filter,
    forced_runs,
    uncertainty_order,
)
from kvshare.kernels import Narrow, to_device
from kvshare.registry import Registry

Record = Callable[[str, Tensor, Tensor], None]


def _selection(forced: Tensor, asm: Assembly) -> Plan:
    """The ``forced`` [S] bool tokens, exact prefix excluded, as a plain (one-pass) plan.
    Without relocated runs that is every token after the prefix: a tail, built on the host."""
    if not asm.runs:
        return _tail(asm)
    forced[: asm.prefix] = False
    return Plan(forced.nonzero().flatten())


def _tail(asm: Assembly) -> Plan:
    """Every token after the exact prefix: ``[prefix, S)``."""
    n = asm.relocated.shape[0]
    return Plan(torch.arange(asm.prefix, n, device=asm.relocated.device), tail=asm.prefix)


class OffsetStep(NamedTuple):
    """What placing anchor offsets sees: the call's assembly (its cache is written in place),
    the run estimates, the chosen plan, the rotary embedding, and ``record`` for fitted gains."""

    config: EngineConfig
    pool: AnchorPool | None
    asm: Assembly
    estimates: list[RunEstimate]
    plan: Plan
    rotary: nn.Module
    record: Record | None = None


class ReusePolicy(ABC):
    """A mode. Flags: ``keeps_kv`` (stores what calls compute), ``relocates`` (reuses runs of
    earlier calls' traces), ``anchored`` (estimates and learns anchor offsets), ``adapts``
    (steers its recompute ratio toward ``target_kl`` from shadowed calls)."""

    name: ClassVar[str]
    keeps_kv: ClassVar[bool] = True
    relocates: ClassVar[bool] = False
    anchored: ClassVar[bool] = False
    adapts: ClassVar[bool] = False

    def choose(
        self, config: EngineConfig, asm: Assembly, estimates: list[RunEstimate], ratio: float
    ) -> Plan:
        """Tokens to compute: those without KV and the last one (the base rule)."""
        forced = asm.fresh
        forced[-1] = True
        return _selection(forced, asm)

    def offsets(self, step: OffsetStep) -> Narrow | None:
        """Put anchor offsets into ``asm.cache``; the gradual prefill's rule (default: the
        plan's own, no offsets)."""
        return step.plan.narrow


class FullPolicy(ReusePolicy):
    """Prefill everything, keep nothing: the oracle of every reuse path."""

    name = "full"
    keeps_kv = False


class PrefixPolicy(ReusePolicy):
    """Exact longest-prefix reuse only (what vLLM / SGLang do)."""

    name = "prefix"


class BlendPolicy(ReusePolicy):
    """Relocated runs; recompute run starts and the ``ratio`` share with the largest deviation
    at the check layers (CacheBlend with an exact causal mask)."""

    name = "blend"
    relocates = True
    recent = False
    uncertainty = False

    def choose(
        self, config: EngineConfig, asm: Assembly, estimates: list[RunEstimate], ratio: float
    ) -> Plan:
        """Sinks (and, ``kvshare``, the last ``recent_tokens``) forced; a gradual prefill over
        every relocated token keeps the top ``ratio`` of them by check-layer deviation."""
        forced = asm.fresh
        forced[-1] = True
        if not asm.runs:
            return _selection(forced, asm)
        sel = config.select
        recent = sel.recent_tokens if self.recent else 0
        host = forced_runs(asm, sel.sink_tokens, recent, last=True)  # forced ∩ relocated
        forced |= to_device(host, forced)
        budget = round(ratio * asm.relocated_count)
        n_cand = asm.relocated_count - int(host.sum())
        if budget <= 0 or n_cand <= 0:
            return _selection(forced, asm)
        unc = uncertainty_order(estimates) if self.uncertainty and estimates else None
        thr = sel.deviation_threshold if self.uncertainty else None
        checks, narrow = deviation_filter(asm, forced, budget, n_cand, sel.check_layers, unc, thr)
        # forced ∪ relocated is every token after the prefix: known on the host
        every = torch.arange(asm.prefix, asm.relocated.shape[0], device=forced.device)
        return Plan(every, checks, narrow)


class AnchorPolicy(ReusePolicy):
    """Relocated runs plus anchor offsets applied whole; KVCOMM's entropy rule recomputes
    everything after the prefix when the anchors are not trusted."""

    name = "anchor"
    relocates = True
    anchored = True

    def choose(
        self, config: EngineConfig, asm: Assembly, estimates: list[RunEstimate], ratio: float
    ) -> Plan:
        forced = asm.fresh
        forced[-1] = True
        if anchor_fallback(estimates, config.anchors.anchor_gamma, config.anchors.neighbours):
            return _tail(asm)
        return _selection(forced, asm)

    def offsets(self, step: OffsetStep) -> Narrow | None:
        if step.pool is not None and step.estimates:
            max_d = step.config.anchors.anchor_max_distance
            cache = step.asm.cache
            skip = not step.config.kernels.fixed_for(cache.keys.device)
            apply_estimates(cache, step.estimates, step.rotary, max_d, None, step.asm.ops, skip)
        return step.plan.narrow


class KVSharePolicy(BlendPolicy):
    """Everything: relocation, anchor offsets validated at the first check layer, sinks, the
    last ``recent_tokens``, the anchors' least certain tokens short-listed, a deviation
    threshold, and a ratio that adapts toward ``target_kl``."""

    name = "kvshare"
    anchored = True
    adapts = True
    recent = True
    uncertainty = True

    def offsets(self, step: OffsetStep) -> Narrow | None:
        """Offsets checked against the fresh KV of the first check layer (gains in [0, 1] to
        ``record``); without a check layer above 0, scaled by the gains recorded earlier."""
        pool, ests, plan, cache = step.pool, step.estimates, step.plan, step.asm.cache
        max_d = step.config.anchors.anchor_max_distance
        if pool is None or not ests:
            return plan.narrow
        skip = not step.config.kernels.fixed_for(cache.keys.device)  # reads are free there
        if plan.narrow is None or plan.checks[0] == 0:  # layer-0 offsets are 0: nothing to fit
            gains = [pool.gain(e.key) for e in ests]
            apply_estimates(cache, ests, step.rotary, max_d, gains, step.asm.ops, skip)
            return plan.narrow
        first, ops, rotary = plan.checks[0], step.asm.ops, step.rotary
        return ValidatedOffsets(
            plan.narrow, ests, cache, rotary, max_d, first, step.record, ops, skip
        )


POLICIES: Registry[ReusePolicy] = Registry("mode")
for _cls in (FullPolicy, PrefixPolicy, BlendPolicy, AnchorPolicy, KVSharePolicy):
    POLICIES.register(_cls.name, _cls)
