"""``wrap(graph, engine=None)``: let a LangGraph workflow tell kvshare what runs next.

The graph itself is returned unchanged (same object, so outputs, stream modes,
checkpointers, interrupts, subgraphs, ``Send`` and ``Command`` behave exactly as before).
What ``wrap`` adds is the *step graph*: the workflow's structure read from its builder
(edges, conditional-branch targets from ``path_map`` or ``Literal`` annotations, ``Command``
destinations, waiting edges for joins; a ``Send`` router without a ``path_map`` may reach any
node), as a networkx ``DiGraph``. When a node calls a :class:`ChatKVShare` model inside a run
with a ``thread_id``, the model hints its engine: this node runs now, its successors next.
Hints never change outputs (``kvshare.hints``).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import networkx as nx

START, END = "__start__", "__end__"
_LOCK = threading.Lock()
_BY_ENGINE: weakref.WeakKeyDictionary[Any, list[nx.DiGraph]] = weakref.WeakKeyDictionary()
_ANY_ENGINE: list[nx.DiGraph] = []


def step_graph(graph: Any) -> nx.DiGraph:
    """The agent step graph of a compiled graph (or its ``StateGraph`` builder). Edge
    attribute ``kind``: ``edge``, ``join``, ``branch``, ``command`` or ``send`` (a router
    whose targets are unknown until it runs: an edge to every node)."""
    builder = getattr(graph, "builder", graph)
    steps = nx.DiGraph()
    steps.add_nodes_from([START, *builder.nodes, END])
    for src, dst in builder.edges:
        steps.add_edge(src, dst, kind="edge")
    for starts, dst in builder.waiting_edges:
        steps.add_edges_from(((s, dst) for s in starts), kind="join")
    for src, branches in builder.branches.items():
        for spec in branches.values():
            ends = list(spec.ends.values()) if spec.ends else None
            targets = ends if ends is not None else [*builder.nodes, END]
            steps.add_edges_from(((src, t) for t in targets), kind="branch" if ends else "send")
    for name, spec in builder.nodes.items():
        steps.add_edges_from(((name, t) for t in getattr(spec, "ends", None) or ()), kind="command")
    return steps


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
