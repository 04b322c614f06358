"""Background prefetch: promote the segments the next agents will use before they run.

``Engine.hint(session, next=[...])`` asks for the segments those agents used (or computed)
before; one daemon thread per engine promotes them up the tiers (``TieredStore.prefetch``),
one segment at a time, so a demand load waits for at most one segment's move and a caller
never waits for a prefetch of another agent. On a CPU-only engine the worker moves a
segment only inside a turn on the model (``kvshare.engine.turns``), between calls: a background
copy on 2 cores would otherwise slow the running call.

A hint that names the agent running now comes right before that agent's call, so what it
asks for is parked until a call of its session ends (:meth:`Prefetcher.call_ended`): the
precompute of the next agents' prompts (a prefill, which takes the model's turn) and, on a
CPU-only engine, the segment moves too, would otherwise queue for the model ahead of the
very call the hint announced. On CUDA the moves start at once (they overlap the call).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext, suppress
from typing import Any

from kvshare.sched.worker import Worker
from kvshare.store.tiered import TieredStore, User


class Prefetcher(Worker):
    """Prefetch worker of one engine (its tiered store, if any, and its precompute jobs).
    ``turn()`` returns the context the worker holds while it moves a segment (the engine's
    turn lock on CPU, nothing on CUDA)."""

    def __init__(
        self,
        store: TieredStore | None,
        turn: Callable[[], AbstractContextManager[Any]] = nullcontext,
        overlap: bool = False,
    ) -> None:
        super().__init__()
        self.store, self.turn, self.overlap = store, turn, overlap
        # session -> (users, precompute jobs); the latest request of a session wins
        self._wanted: dict[str, tuple[list[User], list[Callable[[], Any]]]] = {}
        self._parked: dict[str, tuple[list[User], list[Callable[[], Any]]]] = {}
        self._busy = False  # a popped request is being worked on
        self.promoted = 0
        self.warmed = 0
        self.requests = 0

    def request(
        self,
        session: str,
        users: Iterable[User],
        warm: Iterable[Callable[[], Any]] = (),
        after_call: bool = False,
    ) -> None:
        """Prefetch for ``users`` of ``session`` and run the ``warm`` jobs (precomputing the
        next agents' static prompts; each takes its own turn on the model), replacing that
        session's pending request. ``after_call``: a call of ``session`` is about to run;
        park what would take the model's turn until it ends (``call_ended``)."""
        users, warm = list(users), list(warm)
        with self._cond:
            if self._closed:
                return
            self.requests += 1
            if not after_call:
                self._start(session, users, warm)
            elif self.overlap:  # moves overlap the call; the prefill waits for its end
                self._parked[session] = ([], warm)
                self._start(session, users, [])
            else:
                self._parked[session] = (users, warm)
                self._wanted.pop(session, None)

    def call_ended(self, session: str | None) -> None:
        """A call of ``session`` ended: start what its last hint parked."""
        with self._cond:
            parked = self._parked.pop(session, None) if session is not None else None
            if parked is not None and session is not None and not self._closed:
                self._start(session, *parked)

    def _start(self, session: str, users: list[User], warm: list[Callable[[], Any]]) -> None:
        """Queue a request (``_cond`` held); an empty one replaces nothing."""
        if not users and not warm:
            return
        self._wanted[session] = (users, warm)
        self._spawn(self._run, "kvshare-prefetch")
        self._cond.notify()

    def _next(self) -> tuple[list[User], list[Callable[[], Any]]] | None:
        with self._cond:
            while not self._wanted and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            session = next(iter(self._wanted))
            self._busy = True
            return self._wanted.pop(session)

    def _run(self) -> None:
        while (job := self._next()) is not None:
            users, warm = job
            try:
                store = self.store
                for key in store.keys_used_by(users) if store is not None else ():
                    if self._closed or store is None:
                        return
                    with self.turn():
                        self.promoted += store.prefetch([key])
                for precompute in warm:
                    if self._closed:
                        return
                    with suppress(Exception):  # a failed warm-up only loses the head start
                        precompute()
                        self.warmed += 1
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until no request is pending and the worker is idle (tests, benchmarks)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._wanted and not self._busy, timeout)
