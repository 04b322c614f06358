"""Continuous batching of decodes: every call decoding at once advances in one forward.

After its prefill, a call hands its decode to the engine's :class:`DecodeBatcher` and waits
for its tokens without holding the model. One worker thread runs steps: each takes the
model's turn (``kvshare.engine.turns``), admits the calls that arrived (their prompt KV copied
into a row of :class:`~kvshare.model.batched.DecodeSlots`), feeds every running call's last
token in one :class:`~kvshare.model.batched.BatchedDecoder` step, picks each next token
with the call's own sampling parameters and generator (one host read for the batch), and
frees the rows of calls that finished. Calls join and leave between steps (at most
``max_batch`` decode at once, the rest wait in arrival order); a prefill that arrives waits
for at most one step, and a step for at most one prefill. Asyncio callers
(``Engine.achat``) hand their prefill and their end to the same worker (:meth:`submit`) and
await their tokens (:meth:`adecode`): no thread per call.

A call's tokens are the ones it would decode alone: the same rules in the same order as
``kvshare.engine.decode.decode`` (EOS, stop strings, ``max_new_tokens``, context length),
and its ``on_token`` runs on the calling thread (tokens pass through a queue), so a slow or
failing callback holds up or cancels only its own call.
"""

from __future__ import annotations

import asyncio
import queue
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import torch

from kvshare.engine.decode import (
    GREEDY_BELOW,
    DecodeResult,
    SamplingParams,
    end_reason,
    next_token,
)
from kvshare.kernels import KV
from kvshare.model.batched import BatchedDecoder, DecodeSlots
from kvshare.sched.worker import Worker

_END = object()
T = TypeVar("T")


@dataclass
class Member:
    """One call's decode. tokens: generated so far (the prefill's first included)."""

    prompt: KV
    tokens: list[int]
    max_new_tokens: int
    emit: Callable[[object], Any]  # each token id, then _END: into the caller's queue
    params: SamplingParams
    eos_ids: set[int]
    context_length: int
    generator: torch.Generator | None = None
    should_stop: Callable[[list[int]], bool] | None = None
    row: int | None = None
    reason: str = "length"
    result: DecodeResult | None = None
    error: BaseException | None = None
    cancelled: bool = False

    def ended(self) -> bool:
        """Apply ``decode.end_reason`` after the last token (handed to the caller unless
        it is EOS); True when done."""
        pos = self.prompt.length + len(self.tokens) - 1
        why = end_reason(self.tokens, self.eos_ids, self._hand_over, self.max_new_tokens, pos,
                         self.context_length)  # fmt: skip
        self.reason = why or self.reason
        return why is not None

    def _hand_over(self, tokens: list[int]) -> bool:
        self.emit(tokens[-1])
        return self.should_stop is not None and self.should_stop(tokens)


class DecodeBatcher(Worker):
    """The engine's step loop (see the module docstring). ``turns``: the model's turn."""

    def __init__(
        self,
        decoder: BatchedDecoder,
        turns: AbstractContextManager,
        kv_dims: tuple[int, int, int],
        max_batch: int = 16,
    ) -> None:
        super().__init__()
        self.decoder, self.turns = decoder, turns
        self.slots: DecodeSlots | None = None
        self.kv_dims = kv_dims
        self.max_batch = max_batch
        self._pending: list[Member] = []
        self._running: list[Member] = []  # running[i] holds slot row i
        self._jobs: list[tuple[Callable[[], Any], Future[Any]]] = []
        self.steps = 0
        self.batch_tokens = 0  # tokens fed over all steps (mean batch = batch_tokens / steps)

    def decode(
        self,
        prompt: KV,
        first: int,
        max_new_tokens: int,
        *,
        params: SamplingParams,
        eos_ids: set[int],
        context_length: int,
        generator: torch.Generator | None = None,
        should_stop: Callable[[list[int]], bool] | None = None,
        on_token: Callable[[int], None] | None = None,
    ) -> DecodeResult:
        """Decode after a prefill whose first token was sampled; blocks until done.
        prompt: KV [L, H, S, D] at positions 0..S-1. Same contract as ``decode.decode``."""
        out: queue.Queue[object] = queue.Queue()
        m = Member(prompt, [first], max_new_tokens, out.put, params, eos_ids, context_length,
                   generator, should_stop)  # fmt: skip
        self._enter(m)
        try:
            while (token := out.get()) is not _END:
                if on_token is not None:
                    on_token(cast(int, token))
        except BaseException:
            m.cancelled = True
            raise
        return _outcome(m)

    async def adecode(
        self,
        prompt: KV,
        first: int,
        max_new_tokens: int,
        *,
        on_token: Callable[[int], None] | None = None,
        **rules: Any,
    ) -> DecodeResult:
        """:meth:`decode` for asyncio (``rules``: its keyword arguments): tokens reach
        ``on_token`` on the event loop's thread; no thread waits for them."""
        loop = asyncio.get_running_loop()
        out: asyncio.Queue[object] = asyncio.Queue()

        def emit(item: object) -> None:
            try:
                loop.call_soon_threadsafe(out.put_nowait, item)
            except RuntimeError:  # the caller's loop is closed: nobody waits for this call
                m.cancelled = True

        m = Member(prompt, [first], max_new_tokens, emit=emit, **rules)
        self._enter(m)
        try:
            while (token := await out.get()) is not _END:
                if on_token is not None:
                    on_token(cast(int, token))
        except BaseException:  # a failing callback or a cancelled task
            m.cancelled = True
            raise
        return _outcome(m)

    def _enter(self, m: Member) -> None:
        """Queue ``m`` for the next step (or finish it now when its first token ends it)."""
        if m.ended():
            m.result = DecodeResult(m.tokens, m.prompt, m.reason)
            m.emit(_END)
            return
        with self._cond:
            self._pending.append(m)
            self._spawn(self._run, "kvshare-decode")
            self._cond.notify_all()

    def submit(self, job: Callable[[], T]) -> Future[T]:
        """Run ``job`` on the worker, in a turn on the model, between two steps (what an
        asyncio caller cannot run on its own thread: its prefill, its end)."""
        future: Future[T] = Future()
        with self._cond:
            self._jobs.append((job, future))
            self._spawn(self._run, "kvshare-decode")
            self._cond.notify_all()
        return future

    # ------------------------------------------------------------------ the worker
    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._pending or self._running or self._jobs or self._closed):
                    self._cond.wait()
                if self._closed:
                    return
                jobs, self._jobs = self._jobs, []
                room = max(0, self.max_batch - len(self._running))
                arrived, self._pending = self._pending[:room], self._pending[room:]
            with self.turns:
                for job, future in jobs:
                    _run_job(job, future)
                try:
                    self._step(arrived)
                except BaseException as exc:  # the step failed: every call in it fails
                    for m in [*arrived, *self._running]:
                        if m.result is None:
                            m.error = exc
                            m.emit(_END)
                    self._running, self.slots = [], None

    def _step(self, arrived: Sequence[Member]) -> None:
        for m in arrived:
            self._admit(m)
        for m in [m for m in self._running if m.cancelled]:
            self._leave(m, keep=False)
        if not self._running:
            return
        slots = self.slots
        assert slots is not None
        dev = slots.keys.device
        tokens = torch.tensor([m.tokens[-1] for m in self._running], device=dev)
        positions = torch.tensor(slots.lengths, device=dev)
        logits = self.decoder.step(slots, tokens, positions)  # [B, V]
        self.steps += 1
        self.batch_tokens += len(self._running)
        chosen = logits.argmax(-1)  # greedy rows in one op; sampled rows drawn one by one
        for i, m in enumerate(self._running):
            if m.params.temperature >= GREEDY_BELOW:
                chosen[i] = next_token(logits[i], m.params, m.generator)
        for m, token in zip(list(self._running), chosen.tolist(), strict=True):
            m.tokens.append(int(token))
            if m.ended():
                self._leave(m, keep=True)

    def _admit(self, m: Member) -> None:
        if self.slots is None:
            self.slots = DecodeSlots(self.kv_dims, m.prompt.keys.dtype, m.prompt.keys.device)
        n = m.prompt.length
        capacity = n + max(0, min(m.max_new_tokens, m.context_length - n) - 1)
        m.row = self.slots.admit(m.prompt, capacity)
        self._running.append(m)

    def _leave(self, m: Member, keep: bool) -> None:
        """Finish ``m`` (its KV copied out when ``keep``) and free its row."""
        slots = self.slots
        assert slots is not None and m.row is not None
        if keep:
            m.result = DecodeResult(m.tokens, slots.kv(m.row), m.reason)
        moved = slots.release(m.row)
        last = self._running.pop()
        if moved is not None:  # the last row moved into m's
            self._running[m.row] = last
            last.row = m.row
        m.emit(_END)

    def stats(self) -> dict[str, Any]:
        """Steps run and the mean batch (tokens fed per step)."""
        return {"steps": self.steps, "mean_batch": self.batch_tokens / max(1, self.steps)}


def _outcome(m: Member) -> DecodeResult:
    if m.error is not None:
        raise m.error
    assert m.result is not None
    return m.result


def _run_job(job: Callable[[], Any], future: Future[Any]) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(job())
    except BaseException as exc:  # handed to the caller
        future.set_exception(exc)
