"""Workflow-aware eviction order for the tiered KV store: which stored segment goes first.

A stored segment is used by agents of sessions (workflow runs). Its priority is the fewest
*steps to execution* over those agents: how many steps until one of them runs next, from the
session's step graph and position, corrected by hints (``kvshare.hints``). The segment with
the most steps to go is demoted/evicted first, never-again (``inf``) before anything, least
recently used breaking ties. Shared prefixes (system prompts, tool blocks) may be pinned up to
a byte cap. :class:`LRUScheduler` is the naive baseline: LRU only.

Rules of :func:`steps_to_execution` (a step graph as ``kvshare.integrations.langgraph``
builds it; ``__start__``/``__end__`` are not agents):

- the running agents are at 0; every edge (``edge``, ``branch``, ``command``, ``send``,
  ``subgraph``) adds one step; a node with several ways in (a conditional branch's targets
  among them) takes the nearest: the shortest path;
- a join (incoming edges of kind ``join``) runs once all its join predecessors have run: its
  steps are the max over the ones still to run (not in ``done``) + 1, or 1 when all are done;
  a node with both join and other incoming edges takes the smaller of the two ways;
- cycles: agents are settled once each, in increasing steps (Knuth's generalisation of
  Dijkstra to min/max rules), so a loop is walked at most once and the walk always ends; an
  agent reachable only back through a cycle gets the length of that way round; a join that
  waits on an agent which can only run after the join itself is deadlocked: ``inf``;
- ``max_loop`` bounds the look-ahead: agents farther than that many steps count as ``inf``
  (as LangGraph's ``recursion_limit`` bounds the steps of a run); unreachable agents: ``inf``.
"""

from __future__ import annotations

import heapq
import math
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Collection, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import networkx as nx

from kvshare.errors import ConfigError
from kvshare.hints import Hint
from kvshare.scope import check_id
from kvshare.validate import check_int

__all__ = [
    "BaseScheduler",
    "LRUScheduler",
    "Priority",
    "Scheduler",
    "SchedulerConfig",
    "SegmentInfo",
    "as_step_graph",
    "steps_to_execution",
]

START, END = "__start__", "__end__"
KINDS = frozenset({"edge", "join", "branch", "command", "send", "subgraph"})
DEFAULT_MAX_LOOP = 100


def _check_graph(graph: Any) -> nx.DiGraph:
    """``graph`` if it is a step graph: a DiGraph of str nodes whose edge kinds are known."""
    if not isinstance(graph, nx.DiGraph):
        raise ConfigError(f"a step graph must be a networkx DiGraph, got {type(graph).__name__}")
    for node in graph:
        if not isinstance(node, str):
            raise ConfigError(f"step graph nodes must be agent names (str), got {node!r}")
    for a, b, kind in graph.edges(data="kind", default="edge"):
        if kind not in KINDS:
            raise ConfigError(f"edge {a!r}->{b!r} has unknown kind {kind!r}; use {sorted(KINDS)}")
    return graph


def _join_preds(graph: nx.DiGraph, node: str) -> set[str]:
    if node not in graph:
        return set()
    return {p for p, kind in graph.pred[node].items() if kind.get("kind", "edge") == "join"}


def steps_to_execution(
    graph: nx.DiGraph,
    running: Iterable[str],
    done: Iterable[str] = (),
    max_loop: int = DEFAULT_MAX_LOOP,
) -> dict[str, float]:
    """Steps until each agent of ``graph`` (and each running one) runs next: 0 for ``running``,
    ``inf`` for never (rules in the module docstring). ``done``: agents that already ran and
    whose run a join waiting on them has not consumed yet. ``__start__`` may be running (at
    the start of a run). Raises ConfigError for a graph that is not a step graph."""
    _check_graph(graph)
    max_loop = check_int("max_loop", max_loop, lo=0)
    done = set(done)
    heap: list[tuple[int, str]] = [(0, n) for n in set(running)]
    waiting: dict[str, int] = {}
    for node in graph:
        joins = _join_preds(graph, node)
        waiting[node] = len(joins - done)
        if joins and not waiting[node]:  # every input already ran: it runs next
            heap.append((1, node))
    heapq.heapify(heap)
    settled: dict[str, int] = {}
    while heap and heap[0][0] <= max_loop:
        steps, node = heapq.heappop(heap)
        if node in settled:
            continue
        settled[node] = steps
        for nxt, data in graph.succ[node].items() if node in graph else ():
            if data.get("kind", "edge") != "join":
                heapq.heappush(heap, (steps + 1, nxt))
            elif node not in done:
                waiting[nxt] -= 1
                if waiting[nxt] == 0:  # the last (farthest) join predecessor settled
                    heapq.heappush(heap, (steps + 1, nxt))
    agents = (set(graph) | set(settled)) - {START, END}
    return {a: float(settled[a]) if a in settled else math.inf for a in agents}


def _names(what: str, names: Any) -> list[str]:
    if isinstance(names, (str, bytes)) or not isinstance(names, Iterable):
        raise ConfigError(f"{what} must be a list of agent names, got {names!r}")
    out = list(names)
    if not all(isinstance(n, str) and n for n in out):
        raise ConfigError(f"{what} must hold non-empty agent names (str), got {out!r}")
    return out


def _chain(order: Any) -> nx.DiGraph:
    """``__start__`` -> order[0] -> order[1] -> ... -> ``__end__`` (plain edges)."""
    graph = nx.DiGraph()
    nx.add_path(graph, [START, *_names("order", order), END], kind="edge")
    return graph


def _from_successors(successors: Mapping[Any, Any], order: Any = ()) -> nx.DiGraph:
    """Each agent -> its successors, as ``branch`` edges (the ones that may run next);
    ``__start__`` -> order[0], else the agents nothing precedes (else the first one)."""
    graph = nx.DiGraph()
    graph.add_nodes_from([START, *_names("successors", successors), END])
    for a, nexts in successors.items():
        graph.add_edges_from(((a, b) for b in _names(f"successors[{a!r}]", nexts)), kind="branch")
    agents = [n for n in graph if n not in (START, END)]
    entries = _names("order", order)[:1] or [n for n in agents if not graph.in_degree(n)]
    graph.add_edges_from(((START, n) for n in entries or agents[:1]), kind="edge")
    return graph


def as_step_graph(workflow: Any) -> nx.DiGraph:
    """A step graph (a copy) from: a networkx DiGraph; a LangGraph graph or builder; an
    ``order`` list (a chain); a ``successors`` mapping; or an object with ``order`` /
    ``successors`` (``kvshare.agents.Session``). Raises ConfigError for anything else."""
    if isinstance(workflow, nx.DiGraph):
        return _check_graph(workflow).copy()
    if hasattr(workflow, "builder") or hasattr(workflow, "waiting_edges"):
        from kvshare.integrations.langgraph import step_graph

        return step_graph(workflow)
    if isinstance(workflow, Mapping):
        return _from_successors(workflow)
    if isinstance(workflow, Sequence) and not isinstance(workflow, (str, bytes)):
        return _chain(workflow)
    order, successors = getattr(workflow, "order", None), getattr(workflow, "successors", None)
    if isinstance(successors, Mapping) and successors:
        return _from_successors(successors, order or ())
    if order is not None:
        return _chain(order)
    raise ConfigError(
        f"cannot read a workflow from {type(workflow).__name__}: pass a networkx DiGraph, a "
        "LangGraph graph, an order list or a successors mapping"
    )


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


class SegmentInfo(NamedTuple):
    """A stored segment as the scheduler sees it. ``users``: (session, agent) pairs that use
    it; ``shared_prefix``: a system prompt or tool block, a candidate for pinning."""

    key: Hashable
    nbytes: int
    users: Collection[tuple[str, str]]
    last_used_tick: int
    shared_prefix: bool = False


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


def _live(until: float | None, now: float) -> bool:
    return until is None or now < until


def _kind(graph: nx.DiGraph, a: str, b: str) -> str | None:
    return graph.edges[a, b].get("kind", "edge") if graph.has_edge(a, b) else None


@dataclass
class _Run:
    """One session: its step graph; its position (``running`` agents, ``holders``: agents
    running a subgraph, ``done``: inputs no join has consumed); its hinted overrides."""

    graph: nx.DiGraph
    running: set[str] = field(default_factory=set)
    holders: set[str] = field(default_factory=set)
    done: set[str] = field(default_factory=set)
    ranks: dict[str, int] = field(default_factory=dict)  # hinted next: agent -> steps
    ranks_until: float | None = None
    released: dict[str, float | None] = field(default_factory=dict)  # agent -> until
    estimate: dict[str, float] | None = None
    after: dict[str, float] | None = None  # steps from the step after the running one

    def advance(self, agent: str) -> None:
        """``agent`` runs now (the position rules in :class:`Scheduler`'s docstring)."""
        self.released.pop(agent, None)
        if agent in self.running:
            return
        g, self.estimate, self.after = self.graph, None, None
        after = {
            p for p in self.running | self.holders if _kind(g, p, agent) not in (None, "subgraph")
        }
        inside = {p for p in self.running if _kind(g, p, agent) == "subgraph"}
        if after:  # a new step: the running ones finished; their plain edges fire together
            finished = self.running | (self.holders & after)
            self.holders -= after
            fired = {n for p in finished & set(g) for n in g.succ[p] if _kind(g, p, n) == "edge"}
            self.running = ({agent} | fired) - {END}
        elif inside:  # it runs inside a subgraph that they run
            finished, self.holders = set(), self.holders | inside
            self.running = (self.running - inside) | {agent}
        else:  # no known link: one after the other
            finished, self.running = self.running, {agent}
        self.done = (self.done | finished - {START}) - self.running - _join_preds(g, agent)

    def release(self, agent: str, until: float | None, stop: bool) -> None:
        """``agent`` will not run again (after this run, unless ``stop``)."""
        self.released[agent] = until
        if stop and agent in self.running | self.holders:
            self.running.discard(agent)
            self.holders.discard(agent)
            self.done.add(agent)
            self.estimate = self.after = None

    def steps(self, agent: str, now: float, max_loop: int) -> float:
        """running > live release > live hinted rank > the graph's estimate."""
        if agent in self.running | self.holders:
            return 0.0
        if agent in self.released and _live(self.released[agent], now):
            return math.inf
        if agent in self.ranks and _live(self.ranks_until, now):
            return float(self.ranks[agent])
        if self.estimate is None:  # a holder's subgraph was entered already: not again
            g, held = self.graph, self.holders
            cut = [(h, n) for h in held & set(g) for n in g.succ[h] if _kind(g, h, n) == "subgraph"]
            view = nx.restricted_view(g, (), cut) if cut else g
            self.estimate = steps_to_execution(view, self.running | held, self.done, max_loop)
        return self.estimate.get(agent, math.inf)

    def again(self, agent: str, now: float, max_loop: int) -> float:
        """Steps until a running ``agent`` runs after this run: 1 + its steps from the next
        step (the running agents' successors, every branch taken), or its hinted rank."""
        if agent in self.released and _live(self.released[agent], now):
            return math.inf
        if agent in self.ranks and _live(self.ranks_until, now):
            return float(self.ranks[agent])
        if self.after is None:
            g = self.graph
            nxt = {n for p in self.running & set(g) for n in g.succ[p] if _kind(g, p, n) != "join"}
            nxt -= {END}
            done = self.done | self.running
            self.after = steps_to_execution(g, nxt, done, max_loop) if nxt else {}
        return 1.0 + self.after.get(agent, math.inf)


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
        self._runs: OrderedDict[str, _Run] = OrderedDict()
        self._lock = threading.Lock()

    def _run(self, session: str) -> _Run:
        """The session's state (made when new), as the most recently told about."""
        run = self._runs.get(session) or _Run(nx.DiGraph())
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
            return not _live(until, self._clock())
