"""Step graphs: the workflow as agents and the edges between them, read from a LangGraph
graph (by attribute: no langgraph import), a networkx DiGraph, an ``order`` list or a
``successors`` mapping, and the steps until each agent runs next.

A stored segment is used by agents of sessions (workflow runs). Its priority is the fewest
*steps to execution* over those agents: how many steps until one of them runs next, from the
session's step graph and position, corrected by hints (``kvshare.sched.hints``). The segment with
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
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import networkx as nx

from kvshare.errors import ConfigError
from kvshare.validate import check_int

START, END = "__start__", "__end__"
KINDS = frozenset({"edge", "join", "branch", "command", "send", "subgraph"})
DEFAULT_MAX_LOOP = 100


def step_graph(graph: Any) -> nx.DiGraph:
    """The agent step graph of a compiled graph (or its ``StateGraph`` builder).

    Edge attribute ``kind``: ``edge``, ``join``, ``branch``, ``command``, ``send`` (a router
    whose targets are unknown until it runs: an edge to every node of its graph) or
    ``subgraph``; an edge read twice keeps the kind read first, in that order. A node whose
    runnable is itself a compiled graph (``.builder``) keeps its place and contributes that
    graph's step graph, nested subgraphs included, without its ``__start__``/``__end__``:
    ``subgraph`` edges link the node to the subgraph's entry nodes and the subgraph's exit
    nodes to the node's own successors. Nodes are agents, named by node name (what
    ``langgraph_node`` says inside a subgraph): a subgraph node named like a parent node (or
    a node of another subgraph) is the same node, with the union of their edges (the
    parent's own read first); a link from a node to itself is left out.
    """
    builder = getattr(graph, "builder", graph)
    own = _own_steps(builder)
    steps = own.copy()
    for name, spec in builder.nodes.items():
        sub = getattr(spec, "runnable", None)
        if hasattr(sub, "builder"):
            _link(steps, name, step_graph(sub), list(own.successors(name)))
    return steps


def _add(steps: nx.DiGraph, pairs: Iterable[tuple[str, str]], kind: str) -> None:
    """Add the edges ``pairs`` of ``kind`` that ``steps`` does not have yet."""
    steps.add_edges_from(((a, b) for a, b in pairs if not steps.has_edge(a, b)), kind=kind)


def _own_steps(builder: Any) -> nx.DiGraph:
    """The step graph of ``builder``'s own nodes and edges (subgraphs not opened)."""
    steps = nx.DiGraph()
    steps.add_nodes_from([START, *builder.nodes, END])
    _add(steps, builder.edges, "edge")
    _add(steps, ((s, dst) for starts, dst in builder.waiting_edges for s in starts), "join")
    sends = []
    for src, branches in builder.branches.items():
        for spec in branches.values():
            if spec.ends:
                _add(steps, ((src, t) for t in spec.ends.values()), "branch")
            else:
                sends += [(src, t) for t in [*builder.nodes, END]]
    for name, spec in builder.nodes.items():
        _add(steps, ((name, t) for t in getattr(spec, "ends", None) or ()), "command")
    _add(steps, sends, "send")
    return steps


def _link(steps: nx.DiGraph, node: str, sub: nx.DiGraph, after: list[str]) -> None:
    """Merge subgraph ``sub`` (run by ``node``, followed by ``after``) into ``steps``."""
    inner = [n for n in sub if n not in (START, END)]
    steps.add_nodes_from(inner)
    for a, b, kind in sub.edges(data="kind"):
        if a in inner and b in inner:
            _add(steps, [(a, b)], kind)
    entries = [(node, n) for n in sub.successors(START) if n != END]
    exits = [(n, s) for n in sub.predecessors(END) if n != START for s in after]
    _add(steps, ((a, b) for a, b in entries + exits if a != b), "subgraph")


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


def join_preds(graph: nx.DiGraph, node: str) -> set[str]:
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
        joins = join_preds(graph, node)
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
