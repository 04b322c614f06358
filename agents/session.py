"""The agent API for code without LangGraph: ``Agent`` and ``Session`` over an Engine.

An ``Agent`` is a name and a system prompt (and optional tools) bound to an engine; a
``Session`` is one run of a workflow: it names its agents and, optionally, the order (or the
successors of each agent) they run in, and tells the engine as it goes which agent runs now,
which come next and, at the end, that none will run again (``Engine.hint``). Hints never
change outputs.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvshare.integrations.tools import tool_schemas, with_tools

from kvshare.engine.engine import ChatResult, Engine
from kvshare.errors import ConfigError


@dataclass(frozen=True)
class Agent:
    """name: the agent id every call carries (``CallStats.agent``); system: its system
    prompt, first in every prompt; tools: OpenAI tool dicts or LangChain tools, described to
    the model in a byte-stable block before the system prompt (``kvshare.integrations.tools``)."""

    name: str
    system: str
    engine: Engine
    tools: Sequence[Any] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"Agent name must be a non-empty str, got {self.name!r}")
        if not isinstance(self.system, str):
            raise ConfigError(f"Agent {self.name!r}: system must be a str")

    def messages(self, messages: Any) -> list[Any]:
        """This agent's prompt: its system message, then ``messages`` (a str is one user
        message); with tools, the tool block first."""
        rest = [{"role": "user", "content": messages}] if isinstance(messages, str) else messages
        if isinstance(rest, (str, bytes)) or not isinstance(rest, Sequence):
            raise ConfigError("messages must be a str or a list of messages")
        prompt = [{"role": "system", "content": self.system}, *rest]
        return with_tools(prompt, tool_schemas(self.tools)) if self.tools else prompt

    def chat(self, messages: Any, session: str | None = None, **kwargs: Any) -> ChatResult:
        """``Engine.chat`` as this agent (keyword arguments as there)."""
        return self.engine.chat(self.messages(messages), agent=self.name, session=session, **kwargs)


@dataclass
class Session:
    """One workflow run. ``order``: the agents' names in the order they run (a pipeline), or
    ``successors``: each agent's next agents (a graph). Used as a context manager it hints
    the first agents on entry and releases every agent on exit."""

    agents: Sequence[Agent]
    id: str = field(default_factory=lambda: f"session-{uuid.uuid4().hex[:12]}")
    order: Sequence[str] = ()
    successors: Mapping[str, Sequence[str]] = field(default_factory=dict)
    tenant: str | None = None

    def __post_init__(self) -> None:
        self.by_name = {a.name: a for a in self.agents}
        if len(self.by_name) != len(self.agents) or not self.agents:
            raise ConfigError("a Session needs agents with distinct names")
        engines = {id(a.engine) for a in self.agents}
        if len(engines) != 1:
            raise ConfigError("every agent of a Session must be bound to the same engine")
        known = set(self.order) | set(self.successors)
        known |= {n for nexts in self.successors.values() for n in nexts}
        unknown = sorted(known - set(self.by_name))
        if unknown:
            raise ConfigError(f"order/successors name agents the session lacks: {unknown}")
        self.engine = self.agents[0].engine

    def next_after(self, name: str | None) -> tuple[str, ...]:
        """The agents that run after ``name`` (None: at the start)."""
        if self.successors:
            return tuple(self.successors.get(name, ())) if name else tuple(self.order[:1])
        if name is None:
            return tuple(self.order)
        rest = list(self.order)
        return tuple(rest[rest.index(name) + 1 :]) if name in rest else ()

    def chat(self, agent: str | Agent, messages: Any, **kwargs: Any) -> ChatResult:
        """Run ``agent`` in this session, hinting it as running and what follows it."""
        name = agent.name if isinstance(agent, Agent) else agent
        if name not in self.by_name:
            raise ConfigError(f"agent {name!r} is not part of this session; add it to agents")
        self.engine.hint(self.id, running=name, next=self.next_after(name), tenant=self.tenant)
        return self.by_name[name].chat(messages, session=self.id, tenant=self.tenant, **kwargs)

    def __enter__(self) -> Session:
        if self.order or self.successors:  # steps-to-execution of every agent (eviction)
            self.engine.register_workflow(self.id, self)
        for agent in self.agents:  # precomputed when a hint names the agent as next
            self.engine.register_static(self.id, agent.name, agent.messages([]), self.tenant)
        self.engine.hint(self.id, next=self.next_after(None), tenant=self.tenant)
        return self

    def __exit__(self, *exc: object) -> None:
        self.engine.hint(self.id, release=tuple(self.by_name), tenant=self.tenant)
