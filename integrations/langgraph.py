"""``wrap(graph, engine=None)``: let a LangGraph workflow tell kvshare what runs next.

The graph itself is returned unchanged (same object, so outputs, stream modes,
checkpointers, interrupts, subgraphs, ``Send`` and ``Command`` behave exactly as before).
What ``wrap`` adds is the *step graph*: the workflow's structure read from its builder
(edges, conditional-branch targets from ``path_map`` or ``Literal`` annotations, ``Command``
destinations, waiting edges for joins; a ``Send`` router without a ``path_map`` may reach any
node; a compiled subgraph added as a node is opened, its nodes are agents too), as a networkx
``DiGraph``. When a node calls a :class:`ChatKVShare` model inside a run with a ``thread_id``,
the model hints its engine: this node runs now, its successors next. Hints never change
outputs (``kvshare.sched.hints``).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import networkx as nx

from kvshare.sched.graph import END, START, step_graph

_LOCK = threading.Lock()
_BY_ENGINE: weakref.WeakKeyDictionary[Any, list[nx.DiGraph]] = weakref.WeakKeyDictionary()
_ANY_ENGINE: list[nx.DiGraph] = []


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
