"""The Engine: the facade over the call pipeline (``kvshare.pipeline``), its state and turns."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from functools import partial
from typing import Any

import torch

from kvshare import model as model_loading
from kvshare import pipeline
from kvshare.adapter import ModelAdapter
from kvshare.anchors import AnchorPool, ModelIdentity
from kvshare.config import EngineConfig
from kvshare.decode import cut_at_stop
from kvshare.errors import ConfigError, ScopeError
from kvshare.hints import Hint, HintLog, make_hint
from kvshare.kernels import kernels_for
from kvshare.learned import LearnedState
from kvshare.policy import POLICIES
from kvshare.prefetch import Prefetcher
from kvshare.profile import StageClock
from kvshare.prompt import Prompt
from kvshare.radix import RadixCache
from kvshare.relocate import Assembly
from kvshare.request import Request, make_request
from kvshare.results import ChatResult, MemoryUsage, call_stats, check_finite
from kvshare.schedule import BaseScheduler, LRUScheduler, Scheduler, SchedulerConfig
from kvshare.scope import Scope, check_id, scope_of
from kvshare.stats import CallLedger, CallStats, SessionStats
from kvshare.store import LRUSegmentStore, NullSegmentStore, SegmentStore
from kvshare.tiered import TieredStore, build_tiers, scheduler_priority
from kvshare.turns import TurnLock
from kvshare.workflow import WorkflowMemory


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
        layers = self.adapter.kv_dims[0]
        if self.config.anchors.feature_layer >= layers:
            raise ConfigError(
                f"feature_layer {self.config.anchors.feature_layer} is not a layer of this model "
                f"({layers} layers); pick one in [0, {layers - 1}]"
            )
        self.policy = POLICIES.create(self.config.mode)
        tiers = self.config.tiers
        self.scheduler: BaseScheduler = (
            Scheduler(SchedulerConfig(pin_bytes=tiers.pin_bytes))
            if tiers.eviction == "workflow"
            else LRUScheduler()
        )
        store = self.config.store
        traces = store.store_segments and self.policy.relocates
        backend = self.config.kernels.kernel_backend
        self.parts = pipeline.Parts(
            loaded=loaded,
            config=self.config,
            policy=self.policy,
            adapter=self.adapter,
            kernels=kernels_for(self.adapter.device, backend),  # KernelUnavailableError first
            prefix_cache=RadixCache(store.prefix_cache_bytes),
            segments=self._segment_store() if traces else NullSegmentStore(),
            learned=LearnedState(self.config, self.policy.anchored, self.adapter.device),
            eos_ids=frozenset(self._eos_ids()),
        )
        self.prefix_cache, self.segments = self.parts.prefix_cache, self.parts.segments
        self.learned, self.kernels = self.parts.learned, self.parts.kernels
        self.rotary, self.eos_ids = self.adapter.rotary, set(self.parts.eos_ids)
        self.ledger = CallLedger(self.config.call_log_size)
        self.hint_log = HintLog(self.config.call_log_size)
        self._turns = TurnLock()
        self.prefetcher = None
        self.workflows = WorkflowMemory(self.config.call_log_size)
        if self.config.tiers.prefetch and self.policy.keeps_kv:
            on_cpu = self.adapter.device.type == "cpu"  # share the cores only between calls
            turn = (lambda: self._turns) if on_cpu else nullcontext
            tiered = self.segments if isinstance(self.segments, TieredStore) else None
            self.prefetcher = Prefetcher(tiered, turn, overlap=not on_cpu)

    def _segment_store(self) -> SegmentStore:
        """The trace store: an LRU store, or a tiered one (``TiersConfig``) whose order comes
        from the workflow scheduler (``kvshare.schedule``)."""
        tiers, budget = self.config.tiers, self.config.store.segment_store_bytes
        workflow = tiers.eviction == "workflow"
        if not workflow and not tiers.host_tier_bytes and tiers.disk_tier_dir is None:
            return LRUSegmentStore(budget)
        stack = build_tiers(tiers, budget, self.adapter.device, self.model)
        priority, pinned = scheduler_priority(self.scheduler), self.scheduler.pinned
        return TieredStore(stack, priority, pinned, trim=workflow)

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
        on_token: Callable[[int], None] | None = None,
    ) -> ChatResult:
        """Answer ``messages`` (dicts ``{"role","content"}``, LangChain messages, tuples).

        Every argument is checked first (``kvshare.request``): ScopeError, ConfigError,
        PromptError or ContextLengthError leave every store, pool and statistic unchanged.
        NonFiniteError: the model produced NaN/inf; nothing from the call is stored.
        on_token: called with every generated token id as it is sampled (streaming; it runs
        on the calling thread, inside the call's turn on the model).
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
        if on_token is not None and not callable(on_token):
            raise ConfigError(f"on_token must be callable (token id -> None), got {on_token!r}")
        try:
            with self._turns:
                return self._call(req, on_token)
        finally:  # the gap after a call: what the session's last hint parked starts now
            if self.prefetcher is not None:
                self.prefetcher.call_ended(req.session)

    def stats(self, session: str | None = None, agent: str | None = None) -> SessionStats:
        """Aggregate CallStats over every call (or those of ``session`` / ``agent``), and the
        number of workflow hints kept for ``session`` (or all)."""
        hints = self.hint_log.count(session)
        return dataclasses.replace(self.ledger.stats(session, agent), hints=hints)

    def hint(
        self,
        session: str,
        running: str | None = None,
        next: Sequence[str] = (),
        release: Sequence[str] = (),
        ttl: float | None = None,
        tenant: str | None = None,
    ) -> Hint:
        """Tell the cache which agent of ``session`` runs now, which run next (in order) and
        which will not run again (``kvshare.hints``). Hints never change outputs: they feed the
        scheduler (what the tiered store keeps up), start a prefetch of the next agents'
        segments and static prompts, and are recorded (``hints()``, ``stats().hints``).
        ``tenant``: whose workflow it is (as in ``chat``): only that tenant's static prompts
        (``register_static``) are precomputed, into that tenant's scope.
        ScopeError / ConfigError for bad ids, names or ttl; nothing recorded then."""
        h = make_hint(session, running, next, release, ttl, tenant)
        self.hint_log.add(h)
        self.scheduler.observe(h)
        self.workflows.observe(h)
        if self.prefetcher is not None and h.next:
            static = self.workflows.static(h.tenant, session, h.next)
            warm = [
                partial(self.precompute, m, agent=a, session=session, tenant=h.tenant)
                for a, m in static
            ]
            users = [(session, a) for a in h.next]
            self.prefetcher.request(session, users, warm, after_call=h.running is not None)
        return h

    def precompute(
        self,
        messages: Any,
        agent: str | None = None,
        session: str | None = None,
        tenant: str | None = None,
    ) -> int:
        """Prefill ``messages`` — an agent's static prompt (tool block, system prompt, known
        shared context) — and keep their KV, so the agent's next call that starts with them
        is an exact-prefix hit. Not a call: no reply, no CallStats. Returns the prompt's
        tokens. Errors as ``chat`` (nothing stored then)."""
        req = make_request(
            self.config, self.tokenizer, self.loaded.context_length, messages,
            agent=agent, session=session, tenant=tenant, max_new_tokens=1,
        )  # fmt: skip
        with self._turns:
            pipeline.precompute(self.parts, req, self.learned.get(req.scope))
        return len(req.prompt)

    def register_static(
        self, session: str, agent: str, messages: Any, tenant: str | None = None
    ) -> None:
        """``agent``'s static prompt in ``tenant``'s ``session`` (its system prompt and tool
        block): when that tenant's hint names it as next, the prefetcher precomputes it
        (``precompute``, in that tenant's scope) in the gap. ScopeError for a bad id."""
        ids = [check_id(n, v) for n, v in (("session", session), ("agent", agent))]
        if None in ids:
            raise ScopeError("register_static needs a session and an agent id (str)")
        self.workflows.set_static(check_id("tenant", tenant), session, agent, messages)

    def register_workflow(self, session: str, workflow: Any) -> None:
        """The step graph ``session`` runs (a networkx graph, a LangGraph graph, an order
        list or a successors mapping): steps-to-execution for eviction (``kvshare.schedule``)."""
        self.scheduler.register(session, workflow)
        self.workflows.set_graph(session, workflow)

    def knows_workflow(self, session: str, workflow: Any) -> bool:
        """Whether ``workflow`` (the same object) is registered for ``session``."""
        return self.workflows.has_graph(session, workflow)

    def hints(self, session: str | None = None) -> list[Hint]:
        """The most recent hints (at most ``call_log_size``), of ``session`` or all."""
        return self.hint_log.recent(session)

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
        """Drop every stored KV (in every tier: a disk tier's files too), everything learned
        and every recorded statistic."""
        with self._turns:
            self.prefix_cache.clear()
            self.segments.clear()
            self.learned.clear()
            self.ledger.clear()
            self.hint_log.clear()

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
        return state.ratio if state is not None else self.config.select.recompute_ratio

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
        pool = AnchorPool.load(
            path, ModelIdentity.of(self.model), self.device, self.config.anchors.anchor_index
        )
        c = self.config
        pool.config = dataclasses.replace(
            pool.config,
            neighbours=c.anchors.neighbours,
            budget_bytes=c.anchors.anchor_budget_bytes,
        )
        with self._turns:
            self.learned.put_pool(scope, pool)

    # ---------------------------------------------------------------- the call
    def _kv_dims(self) -> tuple[int, int, int]:
        return self.adapter.kv_dims

    def _plan(self, scope: Scope, prompt: Prompt) -> Assembly:
        """The assembly a call with ``prompt`` in ``scope`` would prefill over (for tests)."""
        planned = pipeline.plan(self.parts, scope, prompt)
        try:
            return pipeline.assemble_prompt(self.parts, len(prompt), planned)
        finally:
            self.parts.segments.release(r.segment.key for r in planned.runs)

    def _call(self, req: Request, on_token: Callable[[int], None] | None = None) -> ChatResult:
        """The pipeline, in order, with stage times (``kvshare.pipeline`` does the work)."""
        parts, clock = self.parts, StageClock(self.config.profile, self.device)
        clock.add("render", req.render_s)
        state = self.learned.get(req.scope)
        with clock.stage("plan"):
            planned = pipeline.plan(parts, req.scope, req.prompt)
        keys = [r.segment.key for r in planned.runs]
        try:  # stored KV is read here; a tiered store keeps it leased (unmoved) until then
            with clock.stage("assemble"):
                asm = pipeline.assemble_prompt(parts, len(req.prompt), planned)
        finally:
            parts.segments.release(keys)
        with clock.stage("estimate"):
            ests = pipeline.estimate(parts, req, asm, state)
        with clock.stage("choose"):
            chosen = pipeline.choose(parts, asm, ests, state)
        with clock.stage("prefill"):
            pre = pipeline.prefill(parts, req, asm, ests, chosen)
        with clock.stage("sample"):
            first, gen = pipeline.sample_first(pre, req)
        ttft = time.perf_counter() - req.t0
        with clock.stage("learn"):
            pipeline.learn(parts, req.scope, state, pre)
        t1 = time.perf_counter()
        dec = pipeline.decode_reply(parts, req, pre, first, gen, self._turns.pass_turn, on_token)
        decode_s = time.perf_counter() - t1
        clock.add("decode", decode_s)
        with clock.stage("remember"):
            check_finite("the KV of this call", dec.kv.keys, dec.kv.values)
            text = self.tokenizer.decode(dec.tokens, skip_special_tokens=True)
            readers = self.workflows.readers(req.session, req.agent)
            wrote = pipeline.remember(parts, req, dec.tokens, dec.kv, readers)
            user = (req.session, req.agent)
            parts.segments.record_call(keys, wrote, user, readers, req.prompt.ids)
        with clock.stage("shadow"):
            fidelity = pipeline.shadow(parts, req, state, pre, dec.tokens) if req.shadow else {}
        stats = call_stats(
            self.config.mode, req, pre, dec, ttft, decode_s, fidelity, clock.result()
        )
        self.ledger.add(stats)
        return ChatResult(cut_at_stop(str(text), req.stop), dec.tokens, stats)
