"""The Engine: the facade over the call pipeline (``kvshare.engine.pipeline``), its state
and turns."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from kvshare.anchors import AnchorPool, ModelIdentity
from kvshare.config import EngineConfig
from kvshare.engine import call, pipeline, wiring
from kvshare.engine.policy import POLICIES
from kvshare.engine.relocate import Assembly
from kvshare.engine.request import Request, make_request
from kvshare.engine.results import ChatResult, MemoryUsage
from kvshare.engine.stats import CallLedger, CallStats, SessionStats
from kvshare.engine.turns import TurnLock
from kvshare.engine.workflow_calls import WorkflowCalls
from kvshare.errors import ConfigError, ScopeError
from kvshare.model import load as model_loading
from kvshare.model.adapter import ModelAdapter
from kvshare.model.prompt import Prompt
from kvshare.sched.hints import HintLog
from kvshare.sched.workflow import WorkflowMemory
from kvshare.scope import Scope, scope_of

CHAT_OPTIONS = {"agent", "session", "tenant", "max_new_tokens", "temperature", "top_p", "stop",
                "seed", "shadow", "teach"}  # fmt: skip


class Engine(WorkflowCalls):
    """Runs agent chat calls on one model, reusing KV across calls, agents and sessions.

    Thread-safe: calls take fair turns on the model (``kvshare.engine.turns``, arrival
    order) for their prefill and their end; calls decoding at the same time advance together
    in one batched step (``kvshare.engine.batcher``; without it, in turn slices of
    ``decode_slice`` tokens).
    Hints, workflows and static prompts: :class:`~kvshare.engine.workflow_calls.WorkflowCalls`;
    how the parts are built: ``kvshare.engine.wiring``.
    """

    def __init__(self, loaded: model_loading.LoadedModel, config: EngineConfig | None = None):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.config = config or EngineConfig()
        self.adapter = ModelAdapter(self.model)
        wiring.check_feature_layer(self.config, self.adapter)
        self.policy = POLICIES.create(self.config.mode)
        self.scheduler = wiring.make_scheduler(self.config)
        self.parts = wiring.make_parts(
            loaded, self.config, self.policy, self.adapter, self.scheduler
        )
        self.prefix_cache, self.segments = self.parts.prefix_cache, self.parts.segments
        self.learned, self.kernels = self.parts.learned, self.parts.kernels
        self.rotary, self.eos_ids = self.adapter.rotary, set(self.parts.eos_ids)
        self.ledger = CallLedger(self.config.call_log_size)
        self.hint_log = HintLog(self.config.call_log_size)
        self._turns = TurnLock()
        self.workflows = WorkflowMemory(self.config.call_log_size)
        self.prefetcher = wiring.make_prefetcher(self.parts, lambda: self._turns)
        self.teacher = wiring.make_teacher(self.parts, self._turns)
        self.batcher = wiring.make_batcher(self.parts, self._turns)

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
        teach: bool = False,
    ) -> ChatResult:
        """Answer ``messages`` (dicts ``{"role","content"}``, LangChain messages, tuples).

        Every argument is checked first (``kvshare.engine.request``): ScopeError, ConfigError,
        PromptError or ContextLengthError leave every store, pool and statistic unchanged.
        NonFiniteError: the model produced NaN/inf; nothing from the call is stored.
        on_token: called with every generated token id as it is sampled (streaming; it runs
        on the calling thread, inside the call's turn on the model).
        shadow: also prefill the prompt from scratch and report fidelity (``CallStats.kl``,
        ``top1_agree``, ``greedy_match``); it changes nothing learned. teach: let a full
        prefill teach the anchor pool and the recompute ratio (an extra prefill per call;
        ``kvshare.engine.reference``).
        """
        options = dict(agent=agent, session=session, tenant=tenant, max_new_tokens=max_new_tokens,
                       temperature=temperature, top_p=top_p, stop=stop, seed=seed,
                       shadow=shadow, teach=teach)  # fmt: skip
        req = self._request(messages, on_token, options)
        try:
            with self._busy():
                return self._call(req, on_token)
        finally:  # the gap after a call: what the session's last hint parked starts now
            if self.prefetcher is not None:
                self.prefetcher.call_ended(req.session)

    async def achat(
        self, messages: Any, on_token: Callable[[int], None] | None = None, **options: Any
    ) -> ChatResult:
        """:meth:`chat` for asyncio, same arguments and result. The prefill and the end of
        the call run on the engine's step worker and the decode joins its batch, so no
        thread waits for the call; ``on_token`` runs on the event loop's thread. Where calls
        cannot be batched (``batch_decode=False``, another layout) it runs :meth:`chat` in a
        thread."""
        if self.batcher is None:
            return await asyncio.to_thread(self.chat, messages, on_token=on_token, **options)
        req = self._request(messages, on_token, options)
        try:
            with self._busy():
                b = await call.abegin(self, req)
                t1 = time.perf_counter()
                dec = await call.decode_async(self, req, b, on_token)
                s = time.perf_counter() - t1
                return await call.afinish(self, req, b, dec, s)
        finally:
            if self.prefetcher is not None:
                self.prefetcher.call_ended(req.session)

    def _request(self, messages: Any, on_token: Any, options: dict[str, Any]) -> Request:
        """The validated request (``kvshare.engine.request``: ScopeError, ConfigError,
        PromptError or ContextLengthError before anything is touched)."""
        unknown = set(options) - CHAT_OPTIONS
        if unknown:
            raise ConfigError(f"unknown chat option(s): {', '.join(sorted(unknown))}")
        if on_token is not None and not callable(on_token):
            raise ConfigError(f"on_token must be callable (token id -> None), got {on_token!r}")
        ctx = self.loaded.context_length
        req = make_request(self.config, self.tokenizer, ctx, messages, **options)
        if self.batcher is not None:
            self.batcher.check_fits(len(req.prompt), req.max_new_tokens, ctx, self.adapter.dtype)
        return req

    def stats(self, session: str | None = None, agent: str | None = None) -> SessionStats:
        """Aggregate CallStats over every call (or those of ``session`` / ``agent``), and the
        number of workflow hints kept for ``session`` (or all)."""
        hints = self.hint_log.count(session)
        return dataclasses.replace(self.ledger.stats(session, agent), hints=hints)

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
            if self.teacher is not None:
                self.teacher.clear()

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
    def plan(self, scope: Scope, prompt: Prompt) -> Assembly:
        """What a call with ``prompt`` in ``scope`` would reuse, without running it: the
        assembly it would prefill over (exact prefix, relocated runs, their KV). Stores and
        pools are read, not changed."""
        planned = pipeline.plan(self.parts, scope, prompt)
        try:
            return pipeline.assemble_prompt(self.parts, len(prompt), planned)
        finally:
            self.parts.segments.release(r.segment.key for r in planned.runs)

    def _call(self, req: Request, on_token: Callable[[int], None] | None = None) -> ChatResult:
        """The call (``kvshare.engine.call``): its prefill and its end each take a turn on the
        model; its decode runs in the batcher between them (or in turn slices without one)."""
        if self.batcher is None:
            with self._turn():
                b = call.begin(self, req)
                t1 = time.perf_counter()
                dec = pipeline.decode_reply(
                    self.parts, req, b.pre, b.first, b.gen, self._turns.pass_turn, on_token
                )
                return call.finish(self, req, b, dec, time.perf_counter() - t1)
        b = call.begin_batched(self, req, self._turn())
        t1 = time.perf_counter()
        dec = call.decode_batched(self, req, b, on_token)
        return call.finish_turn(self, req, b, dec, time.perf_counter() - t1, self._turns)

    def _busy(self) -> AbstractContextManager[Any]:
        """A call's whole span, as the idle-time teacher sees it."""
        return nullcontext() if self.teacher is None else self.teacher.active()

    def _turn(self) -> AbstractContextManager[Any]:
        """A call's turn on the model (waits on a teaching prefill recorded)."""
        return self._turns if self.teacher is None else self.teacher.turn()
