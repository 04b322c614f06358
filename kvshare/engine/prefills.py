"""Prefills run in chunks by the step loop (``EngineConfig.prefill_chunk_tokens``).

A call whose prefill is an ordinary causal one — the tokens after its exact reused prefix,
nothing relocated to estimate or recompute selectively — hands it to the engine's
:class:`~kvshare.engine.batcher.DecodeBatcher` as a :class:`PrefillJob` instead of taking
the model for it whole. Each step then feeds the running decodes and at most one chunk of
at most ``prefill_chunk_tokens`` tokens (:mod:`kvshare.model.chunked`) in one forward;
jobs go first come, first served, one chunk a step, so a long prompt delays a decode by at
most one chunk's compute, never by its whole prefill. The chunk boundaries are the call's
own (fixed from its first computed token), whatever else runs.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

from torch import Tensor

from kvshare.kernels import KV
from kvshare.model.chunked import Chunk, bounds


@dataclass(eq=False)  # compared by identity
class PrefillJob:
    """Tokens ``[first, S)`` of ``ids`` [S] to prefill into ``kv`` [L, H, S, D] (the call's
    own cache, valid over ``[0, first)``), ``budget`` tokens a step. ``done`` receives the
    last token's logits [V] float32 (or the step's exception)."""

    kv: KV
    ids: Tensor
    first: int
    budget: int
    done: Future[Tensor] = field(default_factory=Future)
    spans: list[tuple[int, int]] = field(init=False)
    at: int = 0  # the next span

    def __post_init__(self) -> None:
        n = int(self.ids.numel())
        if not 0 <= self.first < n or self.kv.length != n:
            raise ValueError(f"prefill job: first {self.first} of {n} tokens, KV {self.kv.length}")
        self.spans = bounds(self.first, n, self.budget)

    def chunk(self) -> Chunk:
        """The next chunk to run."""
        s, e = self.spans[self.at]
        return Chunk(self.kv, self.ids[s:e], s, self.at == len(self.spans) - 1)


class PrefillQueue:
    """The jobs waiting or in progress, oldest first (the caller holds the batcher's lock
    for ``add``; the step loop alone calls the rest)."""

    def __init__(self) -> None:
        self._jobs: deque[PrefillJob] = deque()
        self.chunks = 0  # chunks run over the queue's life
        self.beside = 0  # of them, chunks that ran beside decoding calls

    def __bool__(self) -> bool:
        return bool(self._jobs)

    def add(self, job: PrefillJob) -> None:
        self._jobs.append(job)

    def head(self) -> PrefillJob | None:
        """The job to advance this step (jobs whose caller went away are dropped)."""
        while self._jobs and self._jobs[0].done.cancelled():
            self._jobs.popleft()
        return self._jobs[0] if self._jobs else None

    def advanced(self, job: PrefillJob, logits: Tensor | None, decodes: int) -> None:
        """``job``'s chunk ran (beside ``decodes`` decoding calls); its last one hands the
        logits [V] to the caller."""
        self.chunks += 1
        self.beside += decodes > 0
        job.at += 1
        if job.at == len(job.spans):
            self._jobs.popleft()
            if job.done.set_running_or_notify_cancel():
                assert logits is not None
                job.done.set_result(logits)

    def fail(self, job: PrefillJob, exc: BaseException) -> None:
        """The step running ``job``'s chunk failed: the job fails with it."""
        if self._jobs and self._jobs[0] is job:
            self._jobs.popleft()
        if job.done.set_running_or_notify_cancel():
            job.done.set_exception(exc)
