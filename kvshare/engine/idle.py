"""Idle-time teaching: full prefills that teach the anchor pool in the gaps between calls.

A production call learns from what it computes (``pipeline.learn``); the relocated tokens it
kept it never sees the truth of. With ``idle_teach`` on, each such call leaves a
:class:`TeachJob` (its prompt ids, its runs' estimates, which tokens were relocated, and how
unsure it was: the share of relocated tokens above ``deviation_threshold`` at the last check
layer). One worker thread per engine takes the least sure job once the model has been idle for
``idle_quiet_s``, prefills its prompt from scratch inside a turn on the model and teaches the
pool from it, as ``teach=True`` would (the ratio is left to the production controller).

Off every caller's critical path: the worker starts only after a quiet gap, and gives the
model back between two decoder layers as soon as a call waits (a forward pre-hook on every
layer raises :class:`Preempted`), so a call waits for at most one layer of a teaching prefill
— one *teaching step*. A preempted job goes back to the queue; at most ``idle_jobs`` wait (the
surest are dropped). :meth:`IdleTeacher.stats` counts jobs, preemptions, busy time, the
longest step and every call's wait on the teacher.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from kvshare.engine.correct import RunEstimate
from kvshare.engine.fidelity import full_prefill
from kvshare.engine.learned import ScopeState
from kvshare.engine.pipeline import Parts, teach
from kvshare.engine.request import Request
from kvshare.engine.results import Prefilled
from kvshare.errors import NonFiniteError
from kvshare.model.adapter import between_layers
from kvshare.sched.worker import Worker
from kvshare.scope import Scope


class Preempted(Exception):
    """A call is waiting: the teaching prefill stops before its next layer."""


@dataclass
class TeachJob:
    """One production call to learn from. ids: its prompt [S]; relocated: [S] bool;
    unsure: its share of relocated tokens above the deviation threshold (priority)."""

    scope: Scope
    ids: tuple[int, ...]
    estimates: list[RunEstimate]
    relocated: Tensor
    unsure: float
    seq: int = 0


@dataclass(frozen=True)
class IdleStats:
    """offered/taught/preempted/dropped: jobs; anchors: tokens the taught jobs admitted;
    busy_s: seconds the worker held the model; step_s: its longest step (one layer);
    delays: seconds each call that found the worker on the model waited for its turn."""

    offered: int = 0
    taught: int = 0
    preempted: int = 0
    dropped: int = 0
    anchors: int = 0
    busy_s: float = 0.0
    step_s: float = 0.0
    delays: tuple[float, ...] = ()


@dataclass
class _Tally:
    counts: dict[str, int] = field(default_factory=dict)
    busy_s: float = 0.0
    step_s: float = 0.0
    delays: list[float] = field(default_factory=list)

    def add(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n


@contextmanager
def preemptible(layers: Sequence[nn.Module], stop: Callable[[], bool]) -> Iterator[list[float]]:
    """While inside, every layer's forward (on this thread) first checks ``stop()`` and
    raises :class:`Preempted` when it is true; yields the list of the times layers started."""
    starts: list[float] = []

    def check() -> None:
        if stop():
            raise Preempted
        starts.append(time.perf_counter())

    with between_layers(layers, check):
        yield starts


class IdleTeacher(Worker):
    """The idle-time teaching worker of one engine (see the module docstring). ``turns``:
    the engine's turn lock (``acquire``/``release``/``waiting``)."""

    def __init__(self, parts: Parts, turns: AbstractContextManager, quiet_s: float, jobs: int):
        super().__init__()
        self.parts, self.turns, self.quiet_s, self.capacity = parts, turns, quiet_s, jobs
        self._jobs: list[TeachJob] = []
        self._tally = _Tally()
        self._active = 0  # calls inside their turn or waiting for it
        self._last = time.monotonic()  # when the last call ended
        self._seq = 0
        self._busy = False
        self.holding = False  # the worker holds the model now

    # ------------------------------------------------------------------ callers' side
    def offer(self, req: Request, state: ScopeState, pre: Prefilled) -> None:
        """Queue the call's job (a reused call of a named scope with anchor estimates)."""
        if req.teach or req.scope.anonymous or state.pool is None or not pre.estimates:
            return
        relocated = pre.asm.relocated_count
        unsure = 1.0 if pre.above is None else int(pre.above) / max(1, relocated)
        with self._cond:
            self._seq += 1
            job = TeachJob(req.scope, tuple(req.prompt.ids), pre.estimates, pre.asm.relocated,
                           unsure, self._seq)  # fmt: skip
            self._jobs.append(job)
            self._tally.add("offered")
            self._jobs.sort(key=lambda j: (-j.unsure, -j.seq))  # least sure, then newest
            while len(self._jobs) > self.capacity:
                self._jobs.pop()
                self._tally.add("dropped")
            self._start()

    @contextmanager
    def active(self) -> Iterator[None]:
        """A call from its start to its end: no teaching prefill starts meanwhile, and a
        running one stops at its next layer."""
        with self._cond:
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._last = time.monotonic()
                self._cond.notify_all()

    @contextmanager
    def turn(self) -> Iterator[None]:
        """A call's turn on the model; records its wait when the worker held the model."""
        found_busy, t0 = self.holding, time.perf_counter()
        with self.turns:
            if found_busy:
                with self._cond:
                    self._tally.delays.append(time.perf_counter() - t0)
            yield

    # ------------------------------------------------------------------ the worker
    def _start(self) -> None:
        self._spawn(self._run, "kvshare-teach")
        self._cond.notify_all()

    def _quiet(self) -> bool:
        return self._active == 0 and time.monotonic() - self._last >= self.quiet_s

    def _next(self) -> TeachJob | None:
        """The least sure job once the model has been quiet (None: closed)."""
        with self._cond:
            while not self._closed and not (self._jobs and self._quiet()):
                if self._jobs and not self._active:  # wait out the rest of the quiet gap
                    self._cond.wait(max(self.quiet_s - (time.monotonic() - self._last), 1e-3))
                else:
                    self._cond.wait()
            if self._closed:
                return None
            self._busy = True
            return self._jobs.pop(0)

    def _run(self) -> None:
        while (job := self._next()) is not None:
            try:
                self._turn(job)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _turn(self, job: TeachJob) -> None:
        with self.turns:
            with self._cond:
                if not self._quiet() or self._closed:  # a call came first: wait for quiet
                    self._requeue(job)
                    return
                self.holding = True
            t0 = time.perf_counter()
            try:
                self._teach(job)
            except Preempted:
                with self._cond:
                    self._tally.add("preempted")
                    self._requeue(job)
            finally:
                self.holding = False
                with self._cond:
                    self._tally.busy_s += time.perf_counter() - t0

    def _teach(self, job: TeachJob) -> None:
        parts = self.parts
        state = parts.learned.peek(job.scope)
        if state is None or state.pool is None:  # reset, or the scope's pool is gone
            return
        stop = self._waiting
        with torch.inference_mode(), preemptible(parts.adapter.layers, stop) as starts:
            kv, logits = full_prefill(parts.model, job.ids, parts.empty())
            if stop():
                raise Preempted
        steps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
        if not bool(torch.isfinite(logits).all()):
            raise NonFiniteError("a teaching prefill held NaN or inf; nothing was taught")
        added = teach(parts, job.scope, state.pool, job.estimates, kv, job.relocated)
        with self._cond:
            self._tally.add("taught")
            self._tally.add("anchors", added)
            self._tally.step_s = max([self._tally.step_s, *steps])

    def _waiting(self) -> bool:
        """A call waits for the model (or the engine is closing)."""
        return self._active > 0 or self._closed

    def _requeue(self, job: TeachJob) -> None:
        """Put a job back (``_cond`` held), unless the queue filled meanwhile."""
        if len(self._jobs) < self.capacity:
            self._jobs.insert(0, job)
        else:
            self._tally.add("dropped")
        self._cond.notify_all()

    # ------------------------------------------------------------------ control
    def stats(self) -> IdleStats:
        with self._cond:
            t, c = self._tally, self._tally.counts
            return IdleStats(
                c.get("offered", 0), c.get("taught", 0), c.get("preempted", 0),
                c.get("dropped", 0), c.get("anchors", 0), t.busy_s, t.step_s, tuple(t.delays),
            )  # fmt: skip

    def pending(self) -> int:
        with self._cond:
            return len(self._jobs)

    def drain(self, timeout: float = 60.0) -> bool:
        """Wait until no job is pending and the worker is idle (tests, benchmarks)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._jobs and not self._busy, timeout)

    def clear(self) -> None:
        """Drop the pending jobs and the statistics (``Engine.reset``)."""
        with self._cond:
            self._jobs.clear()
            self._tally = _Tally()
