"""The workflow side of the :class:`~kvshare.engine.engine.Engine`, mixed into it: hints
(``kvshare.sched.hints``), registered workflow graphs and static prompts, and the precompute
that a hint's prefetch runs in the gap between calls."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

from kvshare.config import EngineConfig
from kvshare.engine import pipeline
from kvshare.engine.learned import LearnedState
from kvshare.engine.request import make_request
from kvshare.engine.turns import TurnLock
from kvshare.errors import ScopeError
from kvshare.model.load import LoadedModel
from kvshare.sched.hints import Hint, HintLog, make_hint
from kvshare.sched.prefetch import Prefetcher
from kvshare.sched.schedule import BaseScheduler
from kvshare.sched.workflow import WorkflowMemory
from kvshare.scope import check_id


class WorkflowCalls:
    """``hint``, ``precompute``, ``register_static``, ``register_workflow``,
    ``knows_workflow`` and ``hints`` of an Engine, over the Engine's state below."""

    config: EngineConfig
    loaded: LoadedModel
    tokenizer: Any
    parts: pipeline.Parts
    learned: LearnedState
    scheduler: BaseScheduler
    hint_log: HintLog
    workflows: WorkflowMemory
    prefetcher: Prefetcher | None
    _turns: TurnLock

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
        which will not run again (``kvshare.sched.hints``). Hints never change outputs: they feed
        the scheduler (what the tiered store keeps up), start a prefetch of the next agents'
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
        list or a successors mapping): steps-to-execution for eviction
        (``kvshare.sched.schedule``)."""
        self.scheduler.register(session, workflow)
        self.workflows.set_graph(session, workflow)

    def knows_workflow(self, session: str, workflow: Any) -> bool:
        """Whether ``workflow`` (the same object) is registered for ``session``."""
        return self.workflows.has_graph(session, workflow)

    def hints(self, session: str | None = None) -> list[Hint]:
        """The most recent hints (at most ``call_log_size``), of ``session`` or all."""
        return self.hint_log.recent(session)
