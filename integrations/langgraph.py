"""``wrap(graph, engine=None)``: let a LangGraph workflow tell kvshare what runs next.

The graph itself is returned unchanged (same object, so outputs, stream modes,
checkpointers, interrupts, subgraphs, ``Send`` and ``Command`` behave exactly as before).
What ``wrap`` adds is the *step graph*: the workflow's structure read from its builder
(edges, conditional-branch targets from ``path_map`` or ``Literal`` annotations, ``Command``
destinations, waiting edges for joins; a ``Send`` router without a ``path_map`` may reach any
node; a compiled subgraph added as a node is opened, its nodes are agents too), as a networkx
``DiGraph``. When a node calls a :class:`ChatKVShare` model inside a run with a ``thread_id``,
the model hints its engine: this node runs now, its successors next. Hints never change
outputs (``kvshare.hints``).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable
from typing import Any

import networkx as nx

START, END = "__start__", "__end__"
_LOCK = threading.Lock()
_BY_ENGINE: weakref.WeakKeyDictionary[Any, list[nx.DiGraph]] = weakref.WeakKeyDictionary()
_ANY_ENGINE: list[nx.DiGraph] = []


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


def wrap(graph: Any, engine: Any = None) -> Any:
    """Register ``graph``'s step graph (for ``engine``'s models, or any model's) and return
    ``graph`` unchanged."""
    steps = step_graph(graph)
    with _LOCK:
        if engine is None:
            _ANY_ENGINE.append(steps)
        else:
            _BY_ENGINE.setdefault(engine, []).append(steps)
    return graph


def workflow_of(engine: Any, node: str) -> nx.DiGraph | None:
    """The first step graph registered for ``engine`` (or any engine) that has ``node``."""
    with _LOCK:
        graphs = [*_BY_ENGINE.get(engine, ()), *_ANY_ENGINE]
    return next((g for g in graphs if node in g), None)


def successors(engine: Any, node: str) -> tuple[str, ...] | None:
    """The agents that may run after ``node`` in the workflows registered for ``engine``
    (None: no registered workflow has such a node)."""
    with _LOCK:
        graphs = [*_BY_ENGINE.get(engine, ()), *_ANY_ENGINE]
    found = [g for g in graphs if node in g]
    if not found:
        return None
    nexts = {n for g in found for n in g.successors(node)} - {START, END}
    return tuple(sorted(nexts))
