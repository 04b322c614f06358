"""Workflow-aware eviction order for the tiered KV store: which stored segment goes first.

The step graphs and the steps-to-execution rules are in ``kvshare.sched.graph``; the state
of one session that :class:`Scheduler` follows is in ``kvshare.sched.run``.
"""

from __future__ import annotations

import math
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import networkx as nx

from kvshare.errors import ConfigError
from kvshare.sched.graph import DEFAULT_MAX_LOOP, START, as_step_graph
from kvshare.sched.graph import END as END  # END, join_preds, steps_to_execution: re-exported
from kvshare.sched.graph import join_preds as join_preds
from kvshare.sched.graph import steps_to_execution as steps_to_execution
from kvshare.sched.hints import Hint
from kvshare.sched.run import Run, live
from kvshare.scope import check_id
from kvshare.store.uses import SegmentInfo
from kvshare.validate import check_int

__all__ = [
    "BaseScheduler",
    "LRUScheduler",
    "Priority",
    "Scheduler",
    "SchedulerConfig",
]


@dataclass(frozen=True)
class SchedulerConfig:
    """pin_bytes: byte cap of pinned shared prefixes (0: none pinned); max_loop: look-ahead
    of :func:`steps_to_execution`, in steps; max_sessions: sessions remembered (the least
    recently told about is forgotten first)."""

    pin_bytes: int = 0
    max_loop: int = DEFAULT_MAX_LOOP
    max_sessions: int = 10_000

    def __post_init__(self) -> None:
        check_int("pin_bytes", self.pin_bytes, lo=0)
        check_int("max_loop", self.max_loop, lo=0)
        check_int("max_sessions", self.max_sessions, lo=1)


class Priority(NamedTuple):
    """Sort key of a stored segment: ascending order is eviction order. ``neg_steps``: minus
    the fewest steps until an agent using it runs (``-inf``: never/unknown, first out);
    ``last_used_tick``: the least recently used first among equals."""

    neg_steps: float
    last_used_tick: int

    @property
    def steps(self) -> float:
        return -self.neg_steps


class BaseScheduler(ABC):
    """Contract of a scheduler (thread-safe; never raises for unknown sessions or agents).

    - ``register(session, workflow)``: the session's step graph (``as_step_graph``; a new
      session starts at ``__start__``, a known one keeps its position and hints);
      ``forget(session)``: drop all that is known of it; ``observe(hint)``: act on a hint.
    - ``steps(session, agent)``: steps until ``agent`` runs next in ``session``: 0 running
      now, ``inf`` never again or unknown.
    - ``need(session, agent)``: steps until ``agent`` needs what it used again: ``steps``,
      except for an agent running now, whose KV in use is leased by the store: its next
      run after this one.
    - ``priority(users, last_used_tick)``: a :class:`Priority` by ``need``; sorted
      ascending, the segment to evict first comes first.
    - ``pinned(segments)``: keys of the ``shared_prefix`` segments kept whatever their
      priority: most users first, while their bytes fit ``config.pin_bytes``.
    - ``eviction_order(segments)``: keys of the other segments, the first to evict first.
    """

    def __init__(self, config: SchedulerConfig | None = None) -> None:
        self.config = config if config is not None else SchedulerConfig()
        if not isinstance(self.config, SchedulerConfig):
            raise ConfigError(f"config must be a SchedulerConfig, got {self.config!r}")

    @abstractmethod
    def register(self, session: str, workflow: Any) -> None: ...

    @abstractmethod
    def forget(self, session: str) -> None: ...

    @abstractmethod
    def observe(self, hint: Hint) -> None: ...

    @abstractmethod
    def steps(self, session: str, agent: str) -> float: ...

    def _pin_user(self, session: str, agent: str) -> bool:
        """Whether (session, agent) counts as a user of a pinned prefix."""
        return True

    def need(self, session: str, agent: str) -> float:
        return self.steps(session, agent)

    def priority(self, users: Iterable[tuple[str, str]], last_used_tick: int) -> Priority:
        steps = min((self.need(s, a) for s, a in users), default=math.inf)
        return Priority(-steps, last_used_tick)

    def pinned(self, segments: Iterable[SegmentInfo]) -> frozenset[Hashable]:
        weighed: list[tuple[int, int, int, SegmentInfo]] = []
        for seg in segments:
            users = {u for u in seg.users if self._pin_user(*u)} if seg.shared_prefix else ()
            if users:
                weighed.append((-len(users), seg.nbytes, len(weighed), seg))
        keep, room = [], self.config.pin_bytes
        for *_, seg in sorted(weighed):
            if seg.nbytes <= room:
                keep.append(seg.key)
                room -= seg.nbytes
        return frozenset(keep)

    def eviction_order(self, segments: Iterable[SegmentInfo]) -> list[Hashable]:
        segs = list(segments)
        keep = self.pinned(segs)
        rest = [(self.priority(s.users, s.last_used_tick), i) for i, s in enumerate(segs)]
        return [segs[i].key for _, i in sorted(rest) if segs[i].key not in keep]


class LRUScheduler(BaseScheduler):
    """The naive baseline: knows no workflow (every agent at ``inf``), so its priority is the
    least recently used first; pins shared prefixes like :class:`Scheduler`."""

    def register(self, session: str, workflow: Any) -> None:
        check_id("session", session)

    def forget(self, session: str) -> None:
        check_id("session", session)

    def observe(self, hint: Hint) -> None:
        if not isinstance(hint, Hint):
            raise ConfigError(f"observe takes a Hint, got {type(hint).__name__}")

    def steps(self, session: str, agent: str) -> float:
        return math.inf


class Scheduler(BaseScheduler):
    """Workflow-aware: priority by steps to execution, LRU among equals.

    Position (per session; ``register`` starts it at ``__start__``): a hint's ``running``
    agent runs now (0). If a running agent (or a subgraph holder) precedes it by a non-
    ``subgraph`` edge, a new step began (LangGraph supersteps): the running agents finished
    and its ``edge`` successors (all fired together) run with it; if a running agent precedes
    it only by a ``subgraph`` edge, it runs inside that agent's subgraph, which keeps running
    (a holder) until an agent it precedes by another edge runs; with no known link, the
    previous ones finished. Finished agents are ``done`` until a join that waits on them runs.

    Hints: ``next=[a, b]`` puts a at 1, b at 2 until the session's next hint; ``release``
    puts agents at ``inf`` (stopping them, the hint's running agent once it finished) until a
    hint names them running or next; with ``ttl``, a hint's next-ranks and releases lapse at
    ``hint.at + ttl`` (by ``clock()``, ``time.monotonic`` by default), the position stays.
    Order: running > live release > live next-rank > the graph's estimate.
    """

    def __init__(
        self,
        config: SchedulerConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(config)
        self._clock = clock
        self._runs: OrderedDict[str, Run] = OrderedDict()
        self._lock = threading.Lock()

    def _run(self, session: str) -> Run:
        """The session's state (made when new), as the most recently told about."""
        run = self._runs.get(session) or Run(nx.DiGraph())
        self._runs[session] = run
        self._runs.move_to_end(session)
        while len(self._runs) > self.config.max_sessions:
            self._runs.popitem(last=False)
        return run

    def register(self, session: str, workflow: Any) -> None:
        if check_id("session", session) is None:
            raise ConfigError("register needs a session id")
        graph = as_step_graph(workflow)
        with self._lock:
            run = self._run(session)
            run.graph, run.estimate, run.after = graph, None, None
            if not run.running and START in graph:
                run.running = {START}

    def forget(self, session: str) -> None:
        with self._lock:
            self._runs.pop(session, None)

    def observe(self, hint: Hint) -> None:
        if not isinstance(hint, Hint):
            raise ConfigError(f"observe takes a Hint, got {type(hint).__name__}")
        until = None if hint.ttl is None else hint.at + hint.ttl
        with self._lock:
            run = self._run(hint.session)
            if hint.running is not None:
                run.advance(hint.running)
            run.ranks, run.ranks_until = {}, until
            for rank, agent in enumerate(hint.next, start=1):
                run.ranks.setdefault(agent, rank)
                run.released.pop(agent, None)
            for agent in hint.release:
                run.release(agent, until, stop=agent != hint.running)

    def steps(self, session: str, agent: str) -> float:
        with self._lock:
            run = self._runs.get(session)
            if run is None:
                return math.inf
            return run.steps(agent, self._clock(), self.config.max_loop)

    def need(self, session: str, agent: str) -> float:
        with self._lock:
            run = self._runs.get(session)
            if run is None:
                return math.inf
            now, loops = self._clock(), self.config.max_loop
            if agent in run.running:
                return run.again(agent, now, loops)
            return run.steps(agent, now, loops)

    def _pin_user(self, session: str, agent: str) -> bool:
        """Agents released (and not hinted back) no longer hold a prefix pinned."""
        with self._lock:
            run = self._runs.get(session)
            until = run.released.get(agent, -math.inf) if run is not None else -math.inf
            return not live(until, self._clock())
