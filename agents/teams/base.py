"""The reference-team contract and the runner that measures one team on one engine."""

from __future__ import annotations

import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from kvshare.engine.engine import Engine
from kvshare.engine.stats import CallStats
from kvshare.errors import ConfigError

Models = Mapping[str, Any]
"""One LangChain chat model per agent name (``ChatKVShare`` in runs, scripted fakes in tests)."""


class Team(ABC):
    """A reference workflow: a LangGraph graph of agents over scored task items.

    Contract: :meth:`build` returns a compiled graph whose nodes call only ``models[a]`` for
    ``a`` in :attr:`agents`, and whose node names are the agent names (so a ``ChatKVShare``
    takes its agent identity from the LangGraph node); :meth:`inputs` maps one item to the
    graph's input; :meth:`score` maps an item and the graph's final state to [0, 1];
    :meth:`answer` is the final state's answer as text. Nothing depends on wall time or on
    which engine runs, so two runs on one greedy engine give the same states.
    """

    name: ClassVar[str]
    title: ClassVar[str]
    agents: ClassVar[tuple[str, ...]]
    max_tokens: ClassVar[Mapping[str, int]]  # reply budget per agent
    default_items: ClassVar[int]
    score_name: ClassVar[str]

    @abstractmethod
    def items(self, n: int, offset: int = 0) -> Sequence[Any]: ...

    @abstractmethod
    def build(self, models: Models) -> Any: ...

    @abstractmethod
    def inputs(self, item: Any) -> dict[str, Any]: ...

    @abstractmethod
    def score(self, item: Any, state: Mapping[str, Any]) -> float: ...

    @abstractmethod
    def answer(self, state: Mapping[str, Any]) -> str: ...

    def static_prompts(self, item: Any) -> dict[str, list[Any]]:
        """Per agent, the messages its prompts in ``item``'s run start with that are known
        before the run (system prompt, tool block, the item's shared context): what the
        prefetcher may precompute before the agent's turn (``Engine.register_static``).
        Each must render as an exact prefix of the agent's calls. None by default."""
        return {}

    def describe(self, item: Any) -> str:
        """One line naming the item (for the demo)."""
        return str(getattr(item, "question", item))[:160]


@dataclass(frozen=True)
class TeamRun:
    """One team run over ``len(scores)`` items on one engine: per-item scores (0..1) and
    answers, every model call the engine served for the run (in order), wall time."""

    team: str
    mode: str
    scores: tuple[float, ...]
    answers: tuple[str, ...]
    calls: tuple[CallStats, ...]
    wall_s: float

    @property
    def score(self) -> float:
        """Mean task score in points (0..100)."""
        return 100 * sum(self.scores) / len(self.scores) if self.scores else 0.0


def models_for(team: Team, engine: Engine, shadow: bool = False) -> dict[str, Any]:
    """One ``ChatKVShare`` per agent on ``engine`` with the team's reply budget."""
    from kvshare.integrations.langchain import ChatKVShare

    return {
        a: ChatKVShare(engine=engine, max_tokens=team.max_tokens[a], shadow=shadow)
        for a in team.agents
    }


def team_graph(team: Team, engine: Engine, shadow: bool = False) -> Any:
    """``team``'s graph on ``ChatKVShare`` models over ``engine``, wrapped for it."""
    from kvshare.integrations.langgraph import wrap

    return wrap(team.build(models_for(team, engine, shadow)), engine)


def run_team(
    engine: Engine,
    team: Team,
    items: Sequence[Any],
    shadow: bool = False,
    progress: Callable[[int], None] | None = None,
    first: int = 0,
    graph: Any = None,
    static: bool = False,
    before_item: Callable[[str, Any], None] | None = None,
    max_concurrency: int = 1,
) -> TeamRun:
    """Run ``team``'s graph, wrapped for ``engine``, once per item (item k on thread
    ``<team>-<first + k>``);
    the run's calls are those of its threads that ``engine`` still logs (``call_log_size``).

    Tasks of one superstep run one at a time by default (``max_concurrency=1``), so a run is
    reproducible: which parallel branch is served first decides what the other can reuse.
    With ``max_concurrency`` > 1 the branches of a superstep run at once and their decodes
    share the engine's batch (``kvshare.engine.batcher``): ``full`` and ``prefix`` give the
    serial run's answers token for token; in the relocating modes what a branch reuses
    depends on which prefill ran first, so answers may differ within the fidelity bar.
    ``graph``: one built by :func:`team_graph` for this engine (built here when None).
    ``static``: register each item's :meth:`Team.static_prompts` for its thread (the
    prefetcher precomputes them when a hint names the agent next). ``before_item(thread,
    item)``: called before each item's run (benchmarks). After each item the thread's agents
    are released (``Engine.hint(release=...)``): none of them runs in that thread again.
    """
    if max_concurrency < 1:
        raise ConfigError(f"max_concurrency must be >= 1, got {max_concurrency}")
    graph = graph if graph is not None else team_graph(team, engine, shadow)
    threads = [f"{team.name}-{first + k}" for k in range(len(items))]
    scores, answers = [], []
    t0 = time.perf_counter()
    for thread, item in zip(threads, items, strict=True):
        config = {"configurable": {"thread_id": thread}, "max_concurrency": max_concurrency}
        if static:
            for agent, messages in team.static_prompts(item).items():
                engine.register_static(thread, agent, messages)
        if before_item is not None:
            before_item(thread, item)
        state = graph.invoke(team.inputs(item), config)
        engine.hint(thread, release=team.agents)
        scores.append(team.score(item, state))
        answers.append(team.answer(state))
        if progress is not None:
            progress(1)
    wall = time.perf_counter() - t0
    calls = tuple(c for c in engine.calls if c.session in threads)
    return TeamRun(team.name, engine.config.mode, tuple(scores), tuple(answers), calls, wall)


def text(message: Any) -> str:
    """A model reply's text (LangChain message or str), stripped."""
    return str(getattr(message, "content", message)).strip()


NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(reply: str) -> float | None:
    """The number a reply ends on: the first after the last ``Answer:``, else the last one."""
    tail = reply.rsplit("Answer:", 1)[-1] if "Answer:" in reply else reply
    found = NUMBER.findall(tail)
    pick = found[0] if "Answer:" in reply and found else (found[-1] if found else None)
    if pick is None:
        return None
    try:
        return float(pick.replace(",", ""))
    except ValueError:
        return None
