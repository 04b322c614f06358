"""The Engine: request -> plan -> assemble -> prefill -> decode -> remember, for every call."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import torch

from kvshare import model as model_loading
from kvshare.adapter import ModelAdapter
from kvshare.anchors import AnchorPool, ModelIdentity
from kvshare.config import EngineConfig
from kvshare.correct import RunEstimate, commit_hits, estimate_runs, learn
from kvshare.decode import cut_at_stop, decode, sample, stop_checker
from kvshare.errors import ConfigError, ScopeError
from kvshare.fidelity import adapt_ratio, compare, full_prefill
from kvshare.kernels import KV, gradual_prefill, kernels_for, partial_prefill, splice
from kvshare.learned import LearnedState, ScopeState
from kvshare.policy import POLICIES, OffsetStep
from kvshare.profile import StageClock
from kvshare.prompt import Prompt, token_hash
from kvshare.radix import RadixCache
from kvshare.relocate import Assembly, Run, assemble, find_runs
from kvshare.request import Request, make_request
from kvshare.results import ChatResult, MemoryUsage, Prefilled, call_stats, check_finite
from kvshare.scope import Scope, scope_of
from kvshare.stats import GREEDY_CAP, CallLedger, CallStats, SessionStats
from kvshare.store import LRUSegmentStore, NullSegmentStore, SegmentStore, StoredSegment
from kvshare.turns import TurnLock


class Engine:
    """Runs agent chat calls on one model, reusing KV across calls, agents and sessions.

    Thread-safe: calls take fair turns on the model (``kvshare.turns``: prefill whole,
    decode in slices of ``decode_slice`` tokens, waiting calls served in arrival order).
    """

    def __init__(self, loaded: model_loading.LoadedModel, config: EngineConfig | None = None):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.config = config or EngineConfig()
        self.adapter = ModelAdapter(self.model)
        layers = self._kv_dims()[0]
        if self.config.feature_layer >= layers:
            raise ConfigError(
                f"feature_layer {self.config.feature_layer} is not a layer of this model "
                f"({layers} layers); pick one in [0, {layers - 1}]"
            )
        self.prefix_cache = RadixCache(self.config.prefix_cache_bytes)
        self.policy = POLICIES.create(self.config.mode)
        traces = self.config.store_segments and self.policy.relocates
        self.segments: SegmentStore = (
            LRUSegmentStore(self.config.segment_store_bytes) if traces else NullSegmentStore()
        )
        self.rotary = self.adapter.rotary
        self.kernels = kernels_for(self.device)  # KernelUnavailableError before anything runs
        self.eos_ids = self._eos_ids()
        self.learned = LearnedState(self.config, self.policy.anchored)
        self.ledger = CallLedger(self.config.call_log_size)
        self._turns = TurnLock()

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | None = None,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        config: EngineConfig | None = None,
    ) -> Engine:
        """Load a local model (default: the embedded SmolLM2-135M-Instruct) into an Engine."""
        return cls(model_loading.load(name_or_path, device=device, dtype=dtype), config)

    def fork(self, config: EngineConfig | None = None, **options: Any) -> Engine:
        """A new Engine sharing this one's model, with empty stores and its own config."""
        return Engine(self.loaded, (config or self.config).with_options(**options))

    def _eos_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        gen = getattr(self.model, "generation_config", None)
        extra = getattr(gen, "eos_token_id", None)
        ids.update(extra if isinstance(extra, list) else [extra])
        return {int(i) for i in ids if i is not None}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---------------------------------------------------------------- public calls
    def chat(
        self,
        messages: Any,
        agent: str | None = None,
        session: str | None = None,
        tenant: str | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: str | list[str] | tuple[str, ...] | None = None,
        seed: int | None = None,
        shadow: bool = False,
    ) -> ChatResult:
        """Answer ``messages`` (dicts ``{"role","content"}``, LangChain messages, tuples).

        Every argument is checked first (``kvshare.request``): ScopeError, ConfigError,
        PromptError or ContextLengthError leave every store, pool and statistic unchanged.
        NonFiniteError: the model produced NaN/inf; nothing from the call is stored.
        """
        req = make_request(
            self.config,
            self.tokenizer,
            self.loaded.context_length,
            messages,
            agent=agent,
            session=session,
            tenant=tenant,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=stop,
            seed=seed,
            shadow=shadow,
        )
        with self._turns:
            return self._call(req)

    def stats(self, session: str | None = None, agent: str | None = None) -> SessionStats:
        """Aggregate CallStats over every call (or those of ``session`` / ``agent``)."""
        return self.ledger.stats(session, agent)

    @property
    def calls(self) -> list[CallStats]:
        """The most recent calls (at most ``EngineConfig.call_log_size``), oldest first."""
        return self.ledger.recent

    def memory(self) -> MemoryUsage:
        """Bytes held now by the prefix cache, the trace store and every anchor pool."""
        return MemoryUsage(
            self.prefix_cache.bytes_used, self.segments.bytes_used, self.learned.bytes_used
        )

    def reset(self) -> None:
        """Drop every stored KV, everything learned and every recorded statistic."""
        with self._turns:
            self.prefix_cache.clear()
            self.segments.clear()
            self.learned.clear()
            self.ledger.clear()

    # ---------------------------------------------------------------- learned state
    def _named_scope(self, tenant: str | None, session: str | None) -> Scope:
        scope = scope_of(self.config.share_scope, tenant, session)
        if scope.anonymous:
            raise ScopeError(
                "share_scope='session' needs a session id here: a call without one shares "
                "nothing and keeps nothing"
            )
        return scope

    def _anchored_scope(self, tenant: str | None, session: str | None) -> Scope:
        """The named scope of an anchor-pool operation; ConfigError in modes without anchors."""
        if not self.policy.anchored:
            raise ConfigError(f"mode {self.config.mode!r} keeps no anchors")
        return self._named_scope(tenant, session)

    def anchor_pool(self, tenant: str | None = None, session: str | None = None) -> AnchorPool:
        """The anchor pool of a sharing scope (created empty if the scope has none yet).

        Raises ConfigError in modes without anchors (``full``, ``prefix``, ``blend``).
        """
        pool = self.learned.get(self._anchored_scope(tenant, session)).pool
        assert pool is not None
        return pool

    def recompute_ratio(self, tenant: str | None = None, session: str | None = None) -> float:
        """The current ``kvshare`` recompute ratio of a sharing scope."""
        state = self.learned.peek(self._named_scope(tenant, session))
        return state.ratio if state is not None else self.config.recompute_ratio

    def save_anchors(
        self, path: str | os.PathLike[str], tenant: str | None = None, session: str | None = None
    ) -> None:
        """Write a scope's anchor pool to ``path`` (atomic; model identity and checksum)."""
        with self._turns:
            pool = self.anchor_pool(tenant, session)
            pool.save(path, identity=ModelIdentity.of(self.model))

    def load_anchors(
        self, path: str | os.PathLike[str], tenant: str | None = None, session: str | None = None
    ) -> None:
        """Replace a scope's anchor pool with the one saved at ``path``.

        Raises StateFileError (corrupt, truncated, unknown version, bad checksum, non-finite
        values) or ModelMismatchError (saved for another model); the scope keeps its pool then.
        """
        scope = self._anchored_scope(tenant, session)
        pool = AnchorPool.load(path, identity=ModelIdentity.of(self.model))
        c = self.config
        pool.config = dataclasses.replace(
            pool.config, neighbours=c.neighbours, budget_bytes=c.anchor_budget_bytes
        )
        with self._turns:
            self.learned.put_pool(scope, pool)

    # ---------------------------------------------------------------- pipeline
    def _kv_dims(self) -> tuple[int, int, int]:
        return self.adapter.kv_dims

    def _empty(self) -> KV:
        return KV.empty(shape=self._kv_dims(), dtype=self.model.dtype, device=self.device)

    def _plan(self, scope: Scope, prompt: Prompt, clock: StageClock | None = None) -> Assembly:
        """Exact prefix, then (relocating modes) stored runs; tiny reuse is not worth it."""
        clock = clock or StageClock(False, self.device)
        n, policy = len(prompt), self.policy
        parts: list[KV] = []
        runs: list[Run] = []
        with clock.stage("plan"):
            if policy.keeps_kv and not scope.anonymous:
                hit, parts = self.prefix_cache.match(scope, prompt.ids[:-1])  # last: computed
                if policy.relocates:
                    runs = find_runs(prompt, hit, scope, self.segments)
                if hit + sum(r.length for r in runs) < max(1, self.config.min_reuse_share * n):
                    parts, runs = [], []  # a sliver: recompute
        with clock.stage("assemble"):
            prefix_kv = splice(parts) if parts else None
            dims, dtype, dev = self._kv_dims(), self.model.dtype, self.device
            return assemble(n, prefix_kv, runs, dims, self.rotary, dtype, dev, self.kernels)

    def _prefill(
        self, asm: Assembly, req: Request, state: ScopeState, clock: StageClock
    ) -> Prefilled:
        """Anchor offsets (anchor/kvshare), token choice, one partial prefill.

        The assembly's cache is this call's own: offsets and recomputed KV go in in place.
        Gains fitted on the way are returned, not recorded: the call commits them only once
        its result is known to be finite.
        """
        dev, n = self.device, len(req.prompt)
        ids, pos = torch.tensor(req.prompt.ids, device=dev), torch.arange(n, device=dev)
        ests: list[RunEstimate] = []
        pool = state.pool
        with clock.stage("estimate"):
            if pool is not None and asm.runs:
                ests = estimate_runs(
                    pool, asm, req.prompt, req.agent, self.rotary, self.config.feature_layer
                )
        gains: list[tuple[str, float, float]] = []
        with clock.stage("choose"):
            plan = self.policy.choose(self.config, asm, ests, state.ratio)
            record = lambda *g: gains.append(g)  # noqa: E731 - committed after the call
            step = OffsetStep(self.config, pool, asm, ests, plan, self.rotary, record)
            narrow = self.policy.offsets(step)
        with clock.stage("prefill"):
            if narrow is not None:
                res = gradual_prefill(
                    self.model, asm.cache, ids, pos, plan.sel, plan.checks, narrow
                )
            else:
                res = partial_prefill(
                    self.model,
                    asm.cache,
                    ids,
                    pos,
                    plan.sel,
                    max_masked_ratio=self.config.masked_prefill_max_ratio,
                    inplace=True,
                )
        done = torch.zeros(n, dtype=torch.bool, device=dev)
        done[res.recomputed] = True
        return Prefilled(res.kv, res.logits[-1], done, asm, ests, gains)

    def _call(self, req: Request) -> ChatResult:
        clock = StageClock(self.config.profile, self.device)
        clock.add("render", req.render_s)
        state = self.learned.get(req.scope)
        pre = self._prefill(self._plan(req.scope, req.prompt, clock), req, state, clock)
        params = req.sampling
        with clock.stage("sample"):
            check_finite("the first-token logits", pre.logits)
            gen = None if params.seed is None else torch.Generator("cpu").manual_seed(params.seed)
            first = sample(pre.logits.cpu(), params, gen)
        ttft = time.perf_counter() - req.t0
        with clock.stage("learn"):
            self._learn(req.scope, state, pre)
        t1 = time.perf_counter()
        dec = decode(
            self.model,
            pre.kv,
            first,
            req.max_new_tokens,
            params=params,
            eos_ids=self.eos_ids,
            context_length=self.loaded.context_length,
            generator=gen,
            should_stop=stop_checker(self.tokenizer, req.stop),
            pass_turn=self._turns.pass_turn,
            turn_tokens=self.config.decode_slice,
        )
        decode_s = time.perf_counter() - t1
        clock.add("decode", decode_s)
        with clock.stage("remember"):
            check_finite("the KV of this call", dec.kv.keys, dec.kv.values)
            text = self.tokenizer.decode(dec.tokens, skip_special_tokens=True)
            self._remember(req, dec.tokens, dec.kv)
        with clock.stage("shadow"):
            fidelity = self._shadow(req, state, pre, dec.tokens) if req.shadow else {}
        stats = call_stats(
            self.config.mode, req, pre, dec, ttft, decode_s, fidelity, clock.result()
        )
        self.ledger.add(stats)
        return ChatResult(cut_at_stop(str(text), req.stop), dec.tokens, stats)

    def _learn(self, scope: Scope, state: ScopeState, pre: Prefilled) -> None:
        """Commit what the prefill observed: anchor hits, fitted gains, and the true deviation
        of every relocated token it recomputed."""
        pool = state.pool
        if pool is None or not pre.estimates:
            return
        commit_hits(pool, pre.estimates)
        for key, gk, gv in pre.gains:
            pool.record_gain(key, gk, gv)
        self._teach(scope, pool, pre, pre.kv, pre.done & pre.asm.relocated)

    def _teach(
        self, scope: Scope, pool: AnchorPool, pre: Prefilled, true_kv: KV, known: torch.Tensor
    ) -> None:
        """Admit Δ for the ``known`` [S] relocated tokens, room made across every scope's pool
        first (the budget holds at every instant). An anonymous scope keeps nothing."""
        if scope.anonymous or not pre.estimates:
            return
        reserve = pool.token_bytes(*self._kv_dims()) * int(known.sum())
        self.learned.fit_budget(scope, reserve=reserve)
        learn(pool, pre.estimates, true_kv, known, self.rotary)

    def _remember(self, req: Request, tokens: list[int], kv: KV) -> None:
        """Keep what this call computed: radix prefix and (relocating modes) its trace.

        kv: KV [L, H, S + R - 1, D] of the prompt and the reply's fed tokens, owned by this call
        (the trace keeps it without a copy). ``full`` mode is the no-reuse oracle and keeps
        nothing; an anonymous scope (no session in session scope) shares with no one.
        """
        if not self.policy.keeps_kv or req.scope.anonymous:
            return
        prompt, scope = req.prompt, req.scope
        ids = tuple(prompt.ids) + tuple(tokens[:-1])  # the last token was never fed: no KV
        self.prefix_cache.insert(scope, ids, kv)
        digest = token_hash(ids) if self.segments.budget_bytes else ""
        if not digest or (scope, digest) in self.segments:
            return
        bounds = tuple((s.start, f"m{s.index}") for s in prompt.segments)
        bounds += ((prompt.tail.start, "reply"),)
        trace = StoredSegment(scope, digest, ids, kv, "trace", "", req.agent, 0, "m0", bounds)
        self.segments.put(trace)

    def _shadow(
        self, req: Request, state: ScopeState, pre: Prefilled, tokens: list[int]
    ) -> dict[str, Any]:
        """Fidelity of this call vs a full prefill of the same prompt (design.md section 5).

        The full prefill's KV also teaches the scope's anchor pool every relocated token's
        true deviation, and steers the scope's ``kvshare`` recompute ratio toward
        ``target_kl``.
        """
        full = full_prefill(self.model, req.prompt.ids, self._empty())
        check_finite("the shadow prefill", full[1])
        greedy_done = len(tokens) >= GREEDY_CAP or tokens[-1] in self.eos_ids
        out = compare(
            self.model,
            full,
            (pre.kv, pre.logits),
            tokens,
            req.sampling.temperature == 0 and greedy_done,
            self.eos_ids,
            self.loaded.context_length,
        )
        if state.pool is not None:
            self._teach(req.scope, state.pool, pre, full[0], pre.asm.relocated)
        c = self.config
        if self.policy.adapts and c.adaptive and pre.asm.runs:
            state.ratio = adapt_ratio(state.ratio, out["kl"], c.target_kl, c.max_recompute_ratio)
        return out
