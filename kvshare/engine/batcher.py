"""Continuous batching of decodes: every call decoding at once advances in one forward.

After its prefill, a call hands its decode to the engine's :class:`DecodeBatcher` and waits
for its tokens without holding the model. One worker thread runs steps: each takes the
model's turn (``kvshare.engine.turns``), admits the calls that arrived (their prompt KV copied
into a row of :class:`~kvshare.model.batched.DecodeSlots`), feeds every running call's last
token in one :class:`~kvshare.model.batched.BatchedDecoder` step, picks each next token
with the call's own sampling parameters and generator (one host read for the batch), and
frees the rows of calls that finished. Calls join and leave between steps; a prefill that
arrives waits for at most one step, and a step for at most one prefill.

A call's tokens are the ones it would decode alone: the same rules in the same order as
``kvshare.engine.decode.decode`` (EOS, stop strings, ``max_new_tokens``, context length),
and its ``on_token`` runs on the calling thread (tokens pass through a queue), so a slow or
failing callback holds up or cancels only its own call.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch

from kvshare.engine.decode import DecodeResult, SamplingParams, end_reason, next_token
from kvshare.kernels import KV
from kvshare.model.batched import BatchedDecoder, DecodeSlots
from kvshare.sched.worker import Worker

_END = object()


@dataclass
class Member:
    """One call's decode. tokens: generated so far (the prefill's first included)."""

    prompt: KV
    tokens: list[int]
    max_new_tokens: int
    params: SamplingParams
    generator: torch.Generator | None
    eos_ids: set[int]
    context_length: int
    should_stop: Callable[[list[int]], bool] | None
    out: queue.Queue = field(default_factory=queue.Queue)
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
        self.out.put(tokens[-1])
        return self.should_stop is not None and self.should_stop(tokens)


class DecodeBatcher(Worker):
    """The engine's step loop (see the module docstring). ``turns``: the model's turn."""

    def __init__(self, decoder: BatchedDecoder, turns: AbstractContextManager, kv_dims: tuple):
        super().__init__()
        self.decoder, self.turns = decoder, turns
        self.slots: DecodeSlots | None = None
        self.kv_dims = kv_dims
        self._pending: list[Member] = []
        self._running: list[Member] = []  # running[i] holds slot row i
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
        m = Member(prompt, [first], max_new_tokens, params, generator, eos_ids, context_length,
                   should_stop)  # fmt: skip
        if m.ended():
            m.out.put(_END)
            m.result = DecodeResult(m.tokens, prompt, m.reason)
        else:
            with self._cond:
                self._pending.append(m)
                self._spawn(self._run, "kvshare-decode")
                self._cond.notify_all()
        try:
            while (token := m.out.get()) is not _END:
                if on_token is not None:
                    on_token(token)
        except BaseException:
            m.cancelled = True
            raise
        if m.error is not None:
            raise m.error
        assert m.result is not None
        return m.result

    # ------------------------------------------------------------------ the worker
    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._pending or self._running or self._closed):
                    self._cond.wait()
                if self._closed:
                    return
                arrived, self._pending = self._pending, []
            with self.turns:
                try:
                    self._step(arrived)
                except BaseException as exc:  # the step failed: every call in it fails
                    for m in [*arrived, *self._running]:
                        if m.result is None:
                            m.error = exc
                            m.out.put(_END)
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
        chosen = torch.stack([next_token(row, m.params, m.generator)
                              for row, m in zip(logits, self._running, strict=True)])  # fmt: skip
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
        m.out.put(_END)

    def stats(self) -> dict[str, Any]:
        """Steps run and the mean batch (tokens fed per step)."""
        return {"steps": self.steps, "mean_batch": self.batch_tokens / max(1, self.steps)}
