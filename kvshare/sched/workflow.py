"""What an engine remembers of the workflows it serves, beyond the scheduler: which agents
the last hint named after each running agent (they read what it writes), each agent's static
prompt (precomputed when a hint names it next), and which step graph each session registered.
Every map is bounded (least recently set first out)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterable
from typing import Any

from kvshare.sched.hints import Hint


def _put(table: OrderedDict[Any, Any], key: Hashable, value: Any, cap: int) -> None:
    table[key] = value
    table.move_to_end(key)
    while len(table) > cap:
        table.popitem(last=False)


class WorkflowMemory:
    """Thread-safe; ``cap`` entries per map."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._readers: OrderedDict[tuple[str, str], tuple[str, ...]] = OrderedDict()
        # (tenant, session, agent) -> static prompt: a tenant's prompts stay that tenant's
        self._static: OrderedDict[tuple[str | None, str, str], Any] = OrderedDict()
        self._graphs: OrderedDict[str, int] = OrderedDict()  # session -> id(workflow)
        self._lock = threading.Lock()

    def observe(self, hint: Hint) -> None:
        """The hinted next agents read what the running agent writes."""
        if hint.running is not None:
            with self._lock:
                _put(self._readers, (hint.session, hint.running), hint.next, self.cap)

    def readers(self, session: str | None, agent: str | None) -> tuple[str, ...]:
        if session is None or agent is None:
            return ()
        with self._lock:
            return self._readers.get((session, agent), ())

    def set_static(self, tenant: str | None, session: str, agent: str, messages: Any) -> None:
        with self._lock:
            _put(self._static, (tenant, session, agent), messages, self.cap)

    def static(
        self, tenant: str | None, session: str, agents: Iterable[str]
    ) -> list[tuple[str, Any]]:
        """(agent, static prompt) registered by ``tenant`` for ``agents`` of ``session``, in
        order (another tenant's registrations for the same session and agent are not seen)."""
        with self._lock:
            keys = [(tenant, session, a) for a in agents]
            return [(k[2], self._static[k]) for k in keys if k in self._static]

    def set_graph(self, session: str, workflow: Any) -> None:
        with self._lock:
            _put(self._graphs, session, id(workflow), self.cap)

    def has_graph(self, session: str, workflow: Any) -> bool:
        with self._lock:
            return self._graphs.get(session) == id(workflow)
