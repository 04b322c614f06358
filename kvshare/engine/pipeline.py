"""The call pipeline: one small function per step, each seeing only the engine's ``Parts``.

render (``kvshare.engine.request``) → :func:`plan` → :func:`assemble_prompt` → :func:`estimate` →
:func:`choose` (the policy: tokens and offsets) → :func:`prefill` → :func:`sample_first` →
:func:`decode_reply` → :func:`learn` → :func:`remember` (then ``reference``: shadow, teach).
:class:`~kvshare.engine.engine.Engine` is the facade that owns the state, the turns and the order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from kvshare.anchors import AnchorPool
from kvshare.config import EngineConfig
from kvshare.engine.correct import RunEstimate, commit_hits, estimate_runs
from kvshare.engine.correct import learn as learn_offsets
from kvshare.engine.decode import DecodeResult, decode, next_token, stop_checker
from kvshare.engine.exact_shared import adopt_prefix, trace_of
from kvshare.engine.fidelity import steer_ratio
from kvshare.engine.learned import LearnedState, ScopeState
from kvshare.engine.policy import OffsetStep, ReusePolicy
from kvshare.engine.relocate import Assembly, Run, assemble, find_runs
from kvshare.engine.request import Request
from kvshare.engine.results import FittedGain, Prefilled, check_finite, non_finite
from kvshare.engine.select import Plan
from kvshare.kernels import (
    KV,
    KernelOps,
    Narrow,
    gradual_prefill,
    partial_prefill,
    splice,
    to_device,
)
from kvshare.kernels.prefill import causal_tail
from kvshare.model.adapter import ModelAdapter
from kvshare.model.load import LoadedModel
from kvshare.model.prompt import Prompt, token_hash
from kvshare.scope import Scope
from kvshare.store import write_later
from kvshare.store.contract import SegmentStore, StoreKey
from kvshare.store.radix import RadixCache
from kvshare.store.shared import SharedTier


@dataclass(frozen=True)
class Parts:
    """What the steps work with: the model, the config and policy, the kernels, the stores."""

    loaded: LoadedModel
    config: EngineConfig
    policy: ReusePolicy
    adapter: ModelAdapter
    kernels: KernelOps
    prefix_cache: RadixCache
    segments: SegmentStore
    learned: LearnedState
    eos_ids: frozenset[int]
    exact_shared: SharedTier | None = None  # prefix mode: kvshare.engine.exact_shared

    @property
    def model(self) -> nn.Module:
        model: nn.Module = self.loaded.model
        return model

    @property
    def rotary(self) -> nn.Module:
        return self.adapter.rotary

    @property
    def device(self) -> torch.device:
        return self.adapter.device

    def empty(self) -> KV:
        """A KV of zero tokens in the model's dtype, on its device."""
        return KV.empty(shape=self.adapter.kv_dims, dtype=self.adapter.dtype, device=self.device)


class Planned(NamedTuple):
    """Reuse found for a prompt: the exact prefix's KV parts (in order) and relocated runs."""

    prefix: list[KV]
    runs: list[Run]


def plan(parts: Parts, scope: Scope, prompt: Prompt) -> Planned:
    """Exact prefix, then (relocating modes) stored runs; a sliver of reuse is recomputed."""
    policy = parts.policy
    if not policy.keeps_kv or scope.anonymous:
        return Planned([], [])
    hit, found = parts.prefix_cache.match(scope, prompt.ids[:-1])  # the last is computed
    if parts.exact_shared is not None:
        args = (parts.prefix_cache, scope, prompt.ids[:-1], hit, found, parts.device)
        hit, found = adopt_prefix(parts.exact_shared, *args)
    runs = find_runs(prompt, hit, scope, parts.segments) if policy.relocates else []
    if hit + sum(r.length for r in runs) < max(1, parts.config.store.min_reuse_share * len(prompt)):
        parts.segments.release(r.segment.key for r in runs)
        return Planned([], [])
    return Planned(found, runs)


def assemble_prompt(parts: Parts, n: int, planned: Planned) -> Assembly:
    """The cache of a prompt of n tokens: prefix spliced, runs relocated by the kernels."""
    prefix_kv = splice(planned.prefix) if planned.prefix else None
    a, ops = parts.adapter, parts.kernels
    return assemble(n, prefix_kv, planned.runs, a.kv_dims, a.rotary, a.dtype, a.device, ops)


def estimate(parts: Parts, req: Request, asm: Assembly, state: ScopeState) -> list[RunEstimate]:
    """Anchor estimates for every relocated run (anchored modes with a pool)."""
    if state.pool is None or not asm.runs:
        return []
    layer = parts.config.anchors.feature_layer
    return estimate_runs(state.pool, asm, req.prompt, req.agent, parts.rotary, layer)


class Chosen(NamedTuple):
    """The policy's decision: tokens to compute, the gradual prefill's rule (None: one
    partial prefill), and the gains it fits on the way (recorded after the call)."""

    plan: Plan
    narrow: Narrow | None
    gains: list[FittedGain]


def choose(parts: Parts, asm: Assembly, ests: list[RunEstimate], state: ScopeState) -> Chosen:
    """The policy's token choice; anchor offsets placed into ``asm.cache`` (in place)."""
    chosen = parts.policy.choose(parts.config, asm, ests, state.ratio)
    gains: list[FittedGain] = []
    record = lambda *g: gains.append(g)  # noqa: E731 - committed after the call
    step = OffsetStep(parts.config, state.pool, asm, ests, chosen, parts.rotary, record)
    return Chosen(chosen, parts.policy.offsets(step), gains)


def prefill(
    parts: Parts, req: Request, asm: Assembly, ests: list[RunEstimate], chosen: Chosen
) -> Prefilled:
    """One partial or gradual prefill of the chosen tokens over the assembly's cache.

    The cache is this call's own: recomputed KV goes in in place. Gains fitted on the way
    are returned, not recorded: the call commits them once its result is known finite.
    """
    dev, n, sel = parts.device, len(req.prompt), chosen.plan.sel
    pos = torch.arange(n, device=dev)
    ids = to_device(np.asarray(req.prompt.ids, dtype=np.int64), pos)  # pinned, no sync
    limit = parts.config.select.masked_prefill_max_ratio
    if chosen.narrow is not None:
        plan, fixed = chosen.plan, parts.config.kernels.fixed_for(dev)
        args = (asm.cache, ids, pos, sel, plan.checks, chosen.narrow, plan.sizes, fixed)
        res = gradual_prefill(parts.adapter, *args)
    elif chosen.plan.tail is not None and limit < 1.0:  # 1.0: the masked path, always
        res = causal_tail(parts.model, asm.cache, ids, pos, chosen.plan.tail)
    else:
        res = partial_prefill(
            parts.model, asm.cache, ids, pos, sel, max_masked_ratio=limit, inplace=True
        )
    done = torch.zeros(n, dtype=torch.bool, device=dev)
    done[res.recomputed] = True if res.live is None else res.live
    seen = chosen.plan.narrow.above if chosen.plan.narrow is not None else []
    above = seen[-1] if seen else None
    return Prefilled(res.kv, res.logits[-1], done, asm, ests, chosen.gains, above)


def sample_first(pre: Prefilled, req: Request) -> tuple[int, torch.Generator | None]:
    """The first token and the call's seeded generator. The token and the logits'
    finiteness are chosen on the device and read together: the one host read before TTFT."""
    seed = req.sampling.seed
    gen = None if seed is None else torch.Generator("cpu").manual_seed(seed)
    token = next_token(pre.logits, req.sampling, gen)
    finite = torch.isfinite(pre.logits).all()
    first, ok = torch.stack([token, finite.to(token.dtype)]).tolist()
    if not ok:
        raise non_finite("the first-token logits")
    return int(first), gen


def decode_reply(
    parts: Parts,
    req: Request,
    pre: Prefilled,
    first: int,
    gen: torch.Generator | None,
    pass_turn: Any,
    on_token: Callable[[int], None] | None = None,
) -> DecodeResult:
    """Generate the reply over the prefilled cache, passing the turn every slice;
    ``on_token`` sees every generated token id as it is sampled (EOS excepted)."""
    stop = stop_checker(parts.loaded.tokenizer, req.stop)
    should_stop = stop
    if on_token is not None:

        def should_stop(tokens: list[int]) -> bool:  # called once per new token
            on_token(tokens[-1])
            return stop is not None and stop(tokens)

    return decode(
        parts.model,
        pre.kv,
        first,
        req.max_new_tokens,
        params=req.sampling,
        eos_ids=set(parts.eos_ids),
        context_length=parts.loaded.context_length,
        generator=gen,
        should_stop=should_stop,
        pass_turn=pass_turn,
        turn_tokens=parts.config.decode_slice,
    )


def learn(parts: Parts, req: Request, state: ScopeState, pre: Prefilled) -> None:
    """Commit what the prefill observed: the ratio's production signal (a call that does
    not teach; ``fidelity.steer_ratio``), anchor hits, fitted gains, and the true deviation
    of every relocated token it recomputed."""
    c, scope = parts.config.select, req.scope
    if pre.above is not None and parts.policy.adapts and c.adaptive and not req.teach:
        share = int(pre.above) / max(1, pre.asm.relocated_count)  # read now, after TTFT
        state.ratio = steer_ratio(state.ratio, share, c.max_recompute_ratio)
    pool = state.pool
    if pool is None or not pre.estimates:
        return
    commit_hits(pool, pre.estimates)
    for key, gk, gv in pre.gains:  # 0-dim tensors fitted in the prefill: read now, after TTFT
        k, v = float(gk), float(gv)
        if not (math.isnan(k) or math.isnan(v)):
            pool.record_gain(key, k, v)
    teach(parts, scope, pool, pre.estimates, pre.kv, pre.done & pre.asm.relocated)


def teach(
    parts: Parts,
    scope: Scope,
    pool: AnchorPool,
    estimates: list[RunEstimate],
    true_kv: KV,
    known: Tensor,
) -> int:
    """Admit Δ for the ``known`` [S] relocated tokens of a call's runs (``estimates``), room
    made across every scope's pool first (the budget holds at every instant). An anonymous
    scope keeps nothing. Returns the anchor tokens admitted."""
    if scope.anonymous or not estimates:
        return 0
    reserve = pool.token_bytes(*parts.adapter.kv_dims) * int(known.sum())
    parts.learned.fit_budget(scope, reserve=reserve)
    return learn_offsets(pool, estimates, true_kv, known, parts.rotary)


def remember(
    parts: Parts, req: Request, tokens: list[int], kv: KV, readers: Sequence[str] = ()
) -> StoreKey | None:
    """Keep what this call computed: radix prefix and (relocating modes) its trace; returns
    the trace's key (None when no trace is kept). ``readers``: the agents of the session
    expected to read the trace next (a tiered store ranks it by them and by the caller).

    kv: KV [L, H, S + R - 1, D] of the prompt and the reply's fed tokens, owned by this call
    (the trace keeps it without a copy). ``full`` mode is the no-reuse oracle and keeps
    nothing; an anonymous scope (no session in session scope) shares with no one.
    """
    if not parts.policy.keeps_kv or req.scope.anonymous:
        return None
    prompt, scope = req.prompt, req.scope
    ids = tuple(prompt.ids) + tuple(tokens[:-1])  # the last token was never fed: no KV
    parts.prefix_cache.insert(scope, ids, kv)
    if (exact := parts.exact_shared) is not None:  # after the turn: kvshare.store.write_later
        trace = trace_of(req, ids, kv, token_hash(ids))
        write_later.write(lambda: exact.put(trace))
    digest = token_hash(ids) if parts.segments.budget_bytes else ""
    if not digest:
        return None
    if (scope, digest) in parts.segments:
        return (scope, digest)
    trace = trace_of(req, ids, kv, digest)
    stored = parts.segments.put(trace, (req.session, req.agent), readers)
    return trace.key if stored else None


def precompute(parts: Parts, req: Request, state: ScopeState) -> None:
    """Prefill ``req``'s prompt and keep it (``remember``) without a reply: an agent's static
    prompt made ready before its turn. A prompt already cached is left as it is."""
    planned = plan(parts, req.scope, req.prompt)
    try:
        if sum(kv.length for kv in planned.prefix) >= len(req.prompt) - 1:
            return
        asm = assemble_prompt(parts, len(req.prompt), planned)
    finally:
        parts.segments.release(r.segment.key for r in planned.runs)
    ests = estimate(parts, req, asm, state)
    pre = prefill(parts, req, asm, ests, choose(parts, asm, ests, state))
    check_finite("the KV of a precomputed prompt", pre.kv.keys, pre.kv.values)
    remember(parts, req, [0], pre.kv)  # a placeholder reply token, never fed: no KV
