"""Continuous batching of decodes: every call decoding at once advances in one forward.

After its prefill, a call hands its decode to the engine's :class:`DecodeBatcher` and waits
for its tokens without holding the model. One worker thread runs steps: each takes the
model's turn (``kvshare.engine.turns``), admits the calls that arrived (their prompt KV copied
into a row of :class:`~kvshare.model.batched.DecodeSlots`), feeds every running call's last
token in one :class:`~kvshare.model.batched.BatchedDecoder` step, picks each next token
with the call's own sampling parameters and generator (one host read for the batch), and
frees the rows of calls that finished. Calls join and leave between steps (at most
``max_batch`` decode at once; the rest wait, admitted fairly across tenants and in arrival
order within one, :func:`fair_pick`); a prefill that arrives waits
for at most one step, and a step for at most one prefill — or, chunked
(``kvshare.engine.prefills``), rides in the steps a chunk at a time. Asyncio callers
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
import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager
from typing import Any, TypeVar, cast

import torch
from torch import Tensor

from kvshare.engine.decode import (
    GREEDY_BELOW,
    DecodeResult,
    next_token,
)
from kvshare.engine.members import END, Member, check_fits, fair_pick, need_bytes, outcome
from kvshare.engine.prefills import PrefillJob, PrefillQueue
from kvshare.model.batched import BatchedDecoder, DecodeSlots
from kvshare.sched.worker import Worker, run_job

T = TypeVar("T")


class DecodeBatcher(Worker):
    """The engine's step loop (see the module docstring). ``turns``: the model's turn."""

    def __init__(
        self,
        decoder: BatchedDecoder,
        turns: AbstractContextManager,
        kv_dims: tuple[int, int, int],
        max_batch: int = 16,
        budget_bytes: int | None = None,
    ) -> None:
        super().__init__()
        self.decoder, self.turns = decoder, turns
        self.slots: DecodeSlots | None = None
        self.kv_dims = kv_dims
        self.max_batch, self.budget_bytes = max_batch, budget_bytes
        self._pending: list[Member] = []
        self._running: list[Member] = []  # running[i] holds slot row i
        self._jobs: list[tuple[Callable[[], Any], Future[Any]]] = []
        self.prefills = PrefillQueue()  # chunked prefills (kvshare.engine.prefills)
        self.steps = 0
        self.inline_steps = 0  # steps run between the layers of a prefill
        self._last_step = time.monotonic()
        self.batch_tokens = 0  # tokens fed over all steps (mean batch = batch_tokens / steps)
        self._times: deque[tuple[float, float]] = deque(maxlen=1024)  # (step, forward) s

    def decode(self, m: Member, on_token: Callable[[int], None] | None = None) -> DecodeResult:
        """Decode ``m`` (a call after its prefill, its first token sampled; its rules are
        ``decode.decode``'s, the same contract, and its tenant: admission is fair across
        tenants, :func:`~kvshare.engine.members.fair_pick`); blocks until done. The caller
        hands its prompt KV over inside ``m``: once a row holds it, ``m.prompt`` is None."""
        out: queue.Queue[object] = queue.Queue()
        m.emit = out.put
        self._enter(m)
        try:
            while (token := out.get()) is not END:
                if on_token is not None:
                    on_token(cast(int, token))
        except BaseException:
            m.cancelled = True
            raise
        return outcome(m)

    async def adecode(
        self, m: Member, on_token: Callable[[int], None] | None = None
    ) -> DecodeResult:
        """:meth:`decode` for asyncio: tokens reach ``on_token`` on the event loop's thread;
        no thread waits for them."""
        loop = asyncio.get_running_loop()
        out: asyncio.Queue[object] = asyncio.Queue()

        def emit(item: object) -> None:
            try:
                loop.call_soon_threadsafe(out.put_nowait, item)
            except RuntimeError:  # the caller's loop is closed: nobody waits for this call
                m.cancelled = True

        m.emit = emit
        self._enter(m)
        try:
            while (token := await out.get()) is not END:
                if on_token is not None:
                    on_token(cast(int, token))
        except BaseException:  # a failing callback or a cancelled task
            m.cancelled = True
            raise
        return outcome(m)

    def _enter(self, m: Member) -> None:
        """Queue ``m`` for the next step (or finish it now when its first token ends it)."""
        if m.ended():
            assert m.prompt is not None
            m.result = DecodeResult(m.tokens, m.prompt, m.reason)
            m.emit(END)
            return
        self._add(lambda: self._pending.append(m))

    def submit(self, job: Callable[[], T]) -> Future[T]:
        """Run ``job`` on the worker, in a turn on the model, between two steps (what an
        asyncio caller cannot run on its own thread: its prefill, its end)."""
        future: Future[T] = Future()
        self._add(lambda: self._jobs.append((job, future)))
        return future

    def prefill(self, job: PrefillJob) -> Future[Tensor]:
        """Run ``job``'s prefill in chunks inside the coming steps (one chunk a step, jobs
        first come, first served); its future gets the last token's logits [V]."""
        self._add(lambda: self.prefills.add(job))
        job.done.add_done_callback(lambda _: self._add(lambda: None))  # cancelled: drop it
        return job.done

    def _add(self, put: Callable[[], object]) -> None:
        """Queue work (``put`` runs under the lock) and wake the worker."""
        with self._cond:
            put()
            self._spawn(self._run, "kvshare-decode")
            self._cond.notify_all()

    # ------------------------------------------------------------------ the worker
    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._pending or self._running or self._jobs or self.prefills
                           or self._closed):  # fmt: skip
                    self._cond.wait()
                if self._closed:
                    return
            with self.turns:  # calls are taken from the queue only while holding the turn
                with self._cond:
                    jobs, self._jobs = self._jobs, []
                for job, future in jobs:
                    run_job(job, future)
                arrived = self._arrivals()
                try:
                    self._step(arrived)
                except BaseException as exc:  # the step failed: every call in it fails
                    self._fail(arrived, exc)

    def _arrivals(self) -> list[Member]:
        """The waiting calls that join now (turn held): fairly across tenants, up to the
        batch's room."""
        with self._cond:
            room = max(0, self.max_batch - len(self._running))
            arrived = fair_pick(self._pending, self._running, room)
            self._pending = [m for m in self._pending if m not in arrived]
        return arrived

    def step_if_due(self, every_s: float) -> None:
        """One decode step now if the running calls have waited ``every_s`` since the last:
        called between the layers of a prefill that holds the model's turn, so a long
        prefill does not stall every stream (the worker waits for the turn meanwhile)."""
        if not (self._running or self._pending):
            return
        if time.monotonic() - self._last_step >= every_s:
            self.inline_steps += 1
            arrived = self._arrivals()
            try:
                self._step(arrived, chunks=False)  # a prefill holds the model: no chunk
            except BaseException as exc:
                self._fail(arrived, exc)

    def _fail(self, arrived: Sequence[Member], exc: BaseException) -> None:
        """A step failed: every call in it (and every one just arriving) fails with ``exc``."""
        for m in [*arrived, *self._running]:
            if m.result is None:
                m.error = exc
                m.emit(END)
        self._running, self.slots = [], None

    @torch.inference_mode()  # the same mode whichever thread steps (worker or prefill)
    def _step(self, arrived: Sequence[Member], chunks: bool = True) -> None:
        """Admit ``arrived``, then one forward: every running call's next token and (when
        ``chunks``) the oldest chunked prefill's next chunk."""
        t0 = time.perf_counter()
        for i, m in enumerate(arrived):
            full = len(self._running) >= self.max_batch
            if full or not self._admit(m):  # no room: it and the rest wait for a free row
                with self._cond:
                    self._pending[:0] = arrived[i:]
                break
        for m in [m for m in self._running if m.cancelled]:
            self._leave(m, keep=False)
        job = self.prefills.head() if chunks else None
        if not self._running and job is None:
            return
        slots = self.slots if self._running else None
        dev = slots.keys.device if slots is not None else job.ids.device  # type: ignore[union-attr]
        tokens = torch.tensor([m.tokens[-1] for m in self._running], dtype=torch.long, device=dev)
        positions = torch.tensor(slots.positions() if slots else [], dtype=torch.long, device=dev)
        t1 = time.perf_counter()
        try:
            chunk = job.chunk() if job is not None else None
            logits, last = self.decoder.forward(slots, tokens, positions, chunk)
        except BaseException as exc:
            if job is not None:
                self.prefills.fail(job, exc)
            raise
        forward = time.perf_counter() - t1
        if job is not None:
            self.prefills.advanced(job, last, len(self._running))
        self._last_step = time.monotonic()
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
        self._times.append((time.perf_counter() - t0, forward))

    def check_fits(self, prompt: int, max_new_tokens: int, context: int, dtype: Any) -> None:
        """DecodeCapacityError unless a call of ``prompt`` tokens decoding up to
        ``max_new_tokens`` fits the pool's budget alone (checked before the call runs)."""
        if self.budget_bytes is not None:
            need = need_bytes(self.kv_dims, prompt, max_new_tokens, context, dtype)
            check_fits(need, self.budget_bytes, prompt, max_new_tokens)

    def _admit(self, m: Member) -> bool:
        """Give ``m`` a row (False: the pool's budget has no room for it now)."""
        prompt = m.prompt
        assert prompt is not None
        if self.slots is None:
            dtype, device = prompt.keys.dtype, prompt.keys.device
            self.slots = DecodeSlots(self.kv_dims, dtype, device, self.budget_bytes)
        n, skip = prompt.length, m.shared_tokens
        capacity = n + max(0, min(m.max_new_tokens, m.context_length - n) - 1)
        if self._running and not self.slots.fits(capacity - skip):
            return False
        m.row = self.slots.admit(prompt, capacity, m.shared)
        m.prompt = None  # the row is now the only copy
        self._running.append(m)
        return True

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
        if not self._running:  # idle: give the pool's memory back
            self.slots = None
        m.emit(END)

    def stats(self) -> dict[str, Any]:
        """Steps run (those inside prefills among them), the mean batch (tokens fed per
        step), the calls decoding now (``batch``) and waiting for a row (``waiting``), and
        over the last 1,024 steps the median ms of the batched forward and of the step
        outside it (admission, sampling, handing tokens over: ``host_ms``; on a GPU the
        forward's time is its launch unless the sampling read waits for it)."""
        mean = self.batch_tokens / max(1, self.steps)
        times = list(self._times)
        host = statistics.median(s - f for s, f in times) * 1e3 if times else 0.0
        forward = statistics.median(f for _, f in times) * 1e3 if times else 0.0
        with self._cond:
            batch, waiting = len(self._running), len(self._pending)
        return {"steps": self.steps, "inline_steps": self.inline_steps, "mean_batch": mean,
                "batch": batch, "waiting": waiting, "forward_ms": forward,
                "host_ms": host}  # fmt: skip
