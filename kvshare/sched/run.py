"""The state of one session a workflow scheduler follows: its step graph, where it is (running
agents, subgraph holders, finished inputs) and its hinted overrides, and the steps until an
agent runs from there (:class:`Run`, kept per session by ``kvshare.sched.schedule.Scheduler``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import networkx as nx

from kvshare.sched.graph import END, START, join_preds, steps_to_execution


def live(until: float | None, now: float) -> bool:
    """Whether a hint's effect that lasts ``until`` (None: for ever) still holds at ``now``."""
    return until is None or now < until


def kind(graph: nx.DiGraph, a: str, b: str) -> str | None:
    """The kind of the edge ``a -> b`` (``edge`` unless tagged); None if there is none."""
    return graph.edges[a, b].get("kind", "edge") if graph.has_edge(a, b) else None


@dataclass
class Run:
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
        """``agent`` runs now (the position rules in
        :class:`~kvshare.sched.schedule.Scheduler`'s docstring)."""
        self.released.pop(agent, None)
        if agent in self.running:
            return
        g, self.estimate, self.after = self.graph, None, None
        after = {
            p for p in self.running | self.holders if kind(g, p, agent) not in (None, "subgraph")
        }
        inside = {p for p in self.running if kind(g, p, agent) == "subgraph"}
        if after:  # a new step: the running ones finished; their plain edges fire together
            finished = self.running | (self.holders & after)
            self.holders -= after
            fired = {n for p in finished & set(g) for n in g.succ[p] if kind(g, p, n) == "edge"}
            self.running = ({agent} | fired) - {END}
        elif inside:  # it runs inside a subgraph that they run
            finished, self.holders = set(), self.holders | inside
            self.running = (self.running - inside) | {agent}
        else:  # no known link: one after the other
            finished, self.running = self.running, {agent}
        self.done = (self.done | finished - {START}) - self.running - join_preds(g, agent)

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
        if agent in self.released and live(self.released[agent], now):
            return math.inf
        if agent in self.ranks and live(self.ranks_until, now):
            return float(self.ranks[agent])
        if self.estimate is None:  # a holder's subgraph was entered already: not again
            g, held = self.graph, self.holders
            cut = [(h, n) for h in held & set(g) for n in g.succ[h] if kind(g, h, n) == "subgraph"]
            view = nx.restricted_view(g, (), cut) if cut else g
            self.estimate = steps_to_execution(view, self.running | held, self.done, max_loop)
        return self.estimate.get(agent, math.inf)

    def again(self, agent: str, now: float, max_loop: int) -> float:
        """Steps until a running ``agent`` runs after this run: 1 + its steps from the next
        step (the running agents' successors, every branch taken), or its hinted rank."""
        if agent in self.released and live(self.released[agent], now):
            return math.inf
        if agent in self.ranks and live(self.ranks_until, now):
            return float(self.ranks[agent])
        if self.after is None:
            g = self.graph
            nxt = {n for p in self.running & set(g) for n in g.succ[p] if kind(g, p, n) != "join"}
            nxt -= {END}
            done = self.done | self.running
            self.after = steps_to_execution(g, nxt, done, max_loop) if nxt else {}
        return 1.0 + self.after.get(agent, math.inf)
