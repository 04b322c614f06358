"""Workflow hints: what a runtime tells the cache about which agents run now and next.

``Engine.hint(session, running=..., next=[...], release=[...], ttl=...)`` is the in-process
form of vLLM's agent-hint RFC and SGLang's agent hints. Hints only order work and memory;
they never change outputs. They are recorded (the last ``EngineConfig.call_log_size`` hints
per engine, counted in ``SessionStats.hints``) and act on memory: the scheduler ranks stored
segments by the steps until their agents run (``kvshare.sched.schedule``), and a hint's ``next``
starts a prefetch of those agents' segments and static prompts (``kvshare.sched.prefetch``).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from kvshare.errors import ConfigError
from kvshare.scope import check_id
from kvshare.validate import check_float


@dataclass(frozen=True)
class Hint:
    """One hint: in ``session``, ``running`` runs now, ``next`` run after it (in order),
    ``release`` will not run again; ``ttl``: seconds the hint stays valid (None: until the
    next hint of the session). ``at``: ``time.monotonic()`` when it was given. ``tenant``:
    whose workflow it is; what the hint precomputes is stored under that tenant's scope."""

    session: str
    running: str | None
    next: tuple[str, ...]
    release: tuple[str, ...]
    ttl: float | None
    at: float
    tenant: str | None = None


def _names(what: str, names: Any) -> tuple[str, ...]:
    if isinstance(names, str) or not isinstance(names, Iterable):
        raise ConfigError(f"hint {what} must be a list of agent names, got {names!r}")
    out = tuple(names)
    for n in out:
        check_id(f"hint {what} agent", n)
        if n is None:
            raise ConfigError(f"hint {what} has None among its agent names")
    return out


def make_hint(
    session: Any, running: Any, next: Any, release: Any, ttl: Any, tenant: Any = None
) -> Hint:
    """A checked hint (ScopeError for non-str ids, ConfigError for the rest)."""
    tenant = check_id("tenant", tenant)
    if check_id("session", session) is None:
        raise ConfigError("a hint needs a session id (hints are per workflow run)")
    running = check_id("hint running agent", running)
    ttl = None if ttl is None else check_float("ttl", ttl, 0.0, open_lo=True)
    names = _names("next", next), _names("release", release)
    return Hint(session, running, *names, ttl, time.monotonic(), tenant)


class HintLog:
    """The last ``size`` hints (bounded, however many sessions come and go), thread-safe."""

    def __init__(self, size: int) -> None:
        self._recent: deque[Hint] = deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, hint: Hint) -> None:
        with self._lock:
            self._recent.append(hint)

    def recent(self, session: str | None = None) -> list[Hint]:
        with self._lock:
            return [h for h in self._recent if session is None or h.session == session]

    def count(self, session: str | None = None) -> int:
        """Hints of ``session`` (or all) among the kept ones."""
        return len(self.recent(session))

    def clear(self) -> None:
        with self._lock:
            self._recent.clear()
