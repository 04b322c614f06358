"""One call through the pipeline (``kvshare.engine.pipeline``), in three parts: ``begin``
(plan to first token and learning, inside a turn on the model), the decode (batched with
every other decoding call by ``kvshare.engine.batcher``, outside any turn, or sliced by
turns where the model cannot be batched) and ``finish`` (remember, shadow, stats, inside a
turn again)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from kvshare.engine import pipeline
from kvshare.engine.correct import RunEstimate
from kvshare.engine.decode import DecodeResult, cut_at_stop, stop_checker
from kvshare.engine.learned import ScopeState
from kvshare.engine.members import Member
from kvshare.engine.prefills import PrefillJob
from kvshare.engine.profile import StageClock
from kvshare.engine.reference import reference
from kvshare.engine.relocate import Assembly
from kvshare.engine.request import Request
from kvshare.engine.results import ChatResult, Prefilled, call_stats, check_finite
from kvshare.kernels import KV
from kvshare.model.adapter import between_layers
from kvshare.model.shared_prefix import ShareKey
from kvshare.sched.worker import JobRunner
from kvshare.store import write_later
from kvshare.store.contract import StoreKey

if TYPE_CHECKING:
    from kvshare.engine.engine import Engine

SHARED_WRITES = JobRunner("kvshare-shared-writes")  # asyncio calls' shared-tier writes, in order


@dataclass
class Begun:
    """A call after its first token: its clock, state, read keys, prefill and sampler, and
    the exact reused prefix its decode may hold shared (``EngineConfig.share_prefix_tokens``)."""

    clock: StageClock
    state: ScopeState
    keys: list[StoreKey]
    pre: Prefilled
    first: int
    gen: torch.Generator | None
    ttft: float
    shared: ShareKey | None = None


@dataclass
class Prepared:
    """A call planned up to its prefill: what ``begin`` carries over to the first token."""

    clock: StageClock
    state: ScopeState
    keys: list[StoreKey]
    asm: Assembly
    ests: list[RunEstimate]
    chosen: pipeline.Chosen
    shared: ShareKey | None


@dataclass
class Pending:
    """A call whose prefill runs in chunks in the step loop: ``future`` gets its last
    logits [V] (``kvshare.engine.prefills``); then :func:`resume`."""

    prepared: Prepared
    job: PrefillJob
    future: Future[torch.Tensor]
    t0: float


def begin(engine: Engine, req: Request) -> Begun:
    """Plan, assemble, estimate, choose, prefill (whole), sample the first token, learn."""
    started = start(engine, req, chunks=False)
    assert isinstance(started, Begun)
    return started


def start(engine: Engine, req: Request, chunks: bool = True) -> Begun | Pending:
    """:func:`begin`, or (``chunks`` and an ordinary causal prefill with
    ``prefill_chunk_tokens`` set) the call up to its prefill handed to the step loop."""
    p = prepare(engine, req)
    job = _chunked(engine, req, p) if chunks else None
    if job is not None:
        assert engine.batcher is not None
        return Pending(p, job, engine.batcher.prefill(job), time.perf_counter())
    with p.clock.stage("prefill"), _decodes_meanwhile(engine):
        pre = pipeline.prefill(engine.parts, req, p.asm, p.ests, p.chosen)
    return first_token(engine, req, p, pre)


def prepare(engine: Engine, req: Request) -> Prepared:
    """Plan, assemble, estimate, choose (inside a turn on the model)."""
    parts, clock = engine.parts, StageClock(engine.config.profile, engine.device)
    clock.add("render", req.render_s)
    state = engine.learned.get(req.scope)
    with clock.stage("plan"):
        planned = pipeline.plan(parts, req.scope, req.prompt)
    keys = [r.segment.key for r in planned.runs]
    try:  # stored KV is read here; a tiered store keeps it leased (unmoved) until then
        with clock.stage("assemble"):
            asm = pipeline.assemble_prompt(parts, len(req.prompt), planned)
    finally:
        parts.segments.release(keys)
    with clock.stage("estimate"):
        ests = pipeline.estimate(parts, req, asm, state)
    with clock.stage("choose"):
        chosen = pipeline.choose(parts, asm, ests, state)
    return Prepared(clock, state, keys, asm, ests, chosen, _share_key(engine, planned.prefix))


def _chunked(engine: Engine, req: Request, p: Prepared) -> PrefillJob | None:
    """The prefill as a chunked job when it is an ordinary causal one: the tokens after the
    exact prefix, no anchor estimates, no narrowing (what ``pipeline.prefill`` runs through
    ``causal_tail``); else None."""
    budget, plan = engine.config.prefill_chunk_tokens, p.chosen.plan
    masked_only = engine.config.select.masked_prefill_max_ratio >= 1.0
    if budget <= 0 or engine.batcher is None or masked_only or p.ests:
        return None
    if plan.tail is None or p.chosen.narrow is not None:
        return None
    ids = torch.tensor(req.prompt.ids, dtype=torch.long, device=engine.device)
    return PrefillJob(p.asm.cache, ids, plan.tail, budget)


def begin_batched(engine: Engine, req: Request, turn: AbstractContextManager[Any]) -> Begun:
    """:func:`start` inside ``turn``; a chunked prefill is waited for outside it."""
    with turn:
        started = start(engine, req)
    if isinstance(started, Pending):
        return resume(engine, req, started, started.future.result())
    return started


async def abegin(engine: Engine, req: Request) -> Begun:
    """:func:`begin_batched` for asyncio: :func:`start` runs on the step worker (in a turn)
    and a chunked prefill is awaited; no thread waits."""
    assert engine.batcher is not None
    job = engine.batcher.submit(lambda: start(engine, req))
    started = await asyncio.wrap_future(job)
    if isinstance(started, Pending):
        return resume(engine, req, started, await asyncio.wrap_future(started.future))
    return started


def resume(engine: Engine, req: Request, pending: Pending, logits: torch.Tensor) -> Begun:
    """A :class:`Pending` call after its last chunk: its first token and learning."""
    p, job = pending.prepared, pending.job
    p.clock.add("prefill", time.perf_counter() - pending.t0)
    done = torch.zeros(job.kv.length, dtype=torch.bool, device=logits.device)
    done[job.first :] = True
    pre = Prefilled(job.kv, logits, done, p.asm, p.ests, p.chosen.gains, None)
    return first_token(engine, req, p, pre)


def first_token(engine: Engine, req: Request, p: Prepared, pre: Prefilled) -> Begun:
    """Sample the first token and commit what the prefill observed (``pipeline.learn``)."""
    with p.clock.stage("sample"):
        first, gen = pipeline.sample_first(pre, req)
    ttft = time.perf_counter() - req.t0
    with p.clock.stage("learn"):
        pipeline.learn(engine.parts, req, p.state, pre)
        if engine.teacher is not None:  # the idle-time teacher's job (after the 1st token)
            engine.teacher.offer(req, p.state, pre)
    return Begun(p.clock, p.state, p.keys, pre, first, gen, ttft, p.shared)


def _share_key(engine: Engine, prefix: list[KV]) -> ShareKey | None:
    """The reused prefix's parts and their identity (the radix cache's tensors: while a row
    holds them they stay alive, so equal addresses mean the same KV), when it is long enough
    to share. The prefill never writes those slots, so the call's KV starts with them."""
    least, device = engine.config.share_prefix_tokens, engine.device
    if least == 0 or sum(p.length for p in prefix) < least:
        return None
    if any(p.keys.device != device for p in prefix):  # a part in a lower tier: copy it
        return None
    ident = tuple((str(p.keys.device), p.keys.data_ptr(), p.values.data_ptr(), p.length)
                  for p in prefix)  # fmt: skip
    return ident, tuple(prefix)


def _hand_over(b: Begun, req: Request) -> KV:
    """The prompt's KV for the batcher, dropped from ``b`` (and its assembly) unless the
    shadow prefill still reads it: once in a decode row, no second copy stays alive."""
    kv = b.pre.kv
    if not req.shadow:
        layers, heads, _, dim = kv.keys.shape
        keys = kv.keys.new_empty(layers, heads, 0, dim)
        values = kv.values.new_empty(layers, heads, 0, dim)
        asm = replace(b.pre.asm, cache=KV(keys, values))
        b.pre = b.pre._replace(kv=KV(keys, values), asm=asm)
    return kv


def _decodes_meanwhile(engine: Engine) -> AbstractContextManager[Any]:
    """Between the prefill's layers, a decode step for the calls decoding whenever they
    have waited ``decode_every_ms`` (0: the prefill runs whole)."""
    every = engine.config.decode_every_ms / 1000
    if engine.batcher is None or every <= 0:
        return nullcontext()
    batcher = engine.batcher
    return between_layers(engine.adapter.layers, lambda: batcher.step_if_due(every))


def _member(engine: Engine, req: Request, b: Begun) -> Member:
    """The call's place in the batch with its decode rules (``decode.decode``'s) and its
    prompt's KV, handed over (:func:`_hand_over`)."""
    parts = engine.parts
    return Member(
        _hand_over(b, req),
        [b.first],
        req.max_new_tokens,
        params=req.sampling,
        eos_ids=set(parts.eos_ids),
        context_length=parts.loaded.context_length,
        generator=b.gen,
        should_stop=stop_checker(parts.loaded.tokenizer, req.stop),
        tenant=req.tenant,
        shared=b.shared,
    )


def decode_batched(
    engine: Engine, req: Request, b: Begun, on_token: Callable[[int], None] | None
) -> DecodeResult:
    """The reply, decoded by the engine's batcher beside every other decoding call."""
    assert engine.batcher is not None
    return engine.batcher.decode(_member(engine, req, b), on_token)


async def decode_async(
    engine: Engine, req: Request, b: Begun, on_token: Callable[[int], None] | None
) -> DecodeResult:
    """:func:`decode_batched` awaited (tokens reach ``on_token`` on the event loop)."""
    assert engine.batcher is not None
    return await engine.batcher.adecode(_member(engine, req, b), on_token)


def finish_turn(
    engine: Engine,
    req: Request,
    b: Begun,
    dec: DecodeResult,
    decode_s: float,
    turn: AbstractContextManager[Any],
) -> ChatResult:
    """:func:`finish` inside ``turn``; its writes to shared tiers right after it, on this
    thread, with the model free for others (``kvshare.store.write_later``)."""
    with turn, write_later.collected() as pending:
        result = finish(engine, req, b, dec, decode_s)
    write_later.run_all(pending)
    return result


async def afinish(
    engine: Engine, req: Request, b: Begun, dec: DecodeResult, decode_s: float
) -> ChatResult:
    """:func:`finish_turn` for asyncio: ``finish`` on the step worker (in a turn), the writes
    on the one shared writer thread; both awaited, no thread per call."""
    assert engine.batcher is not None

    def job() -> tuple[ChatResult, list[write_later.Write]]:
        with write_later.collected() as pending:
            return finish(engine, req, b, dec, decode_s), pending

    result, pending = await asyncio.wrap_future(engine.batcher.submit(job))
    if pending:
        await asyncio.wrap_future(SHARED_WRITES.submit(lambda: write_later.run_all(pending)))
    return result


def finish(engine: Engine, req: Request, b: Begun, dec: DecodeResult, decode_s: float):
    """Remember what the call computed, run its shadow, record and return its result."""
    parts, clock = engine.parts, b.clock
    clock.add("decode", decode_s)
    with clock.stage("remember"):
        check_finite("the KV of this call", dec.kv.keys, dec.kv.values)
        text = engine.tokenizer.decode(dec.tokens, skip_special_tokens=True)
        readers = engine.workflows.readers(req.session, req.agent)
        wrote = pipeline.remember(parts, req, dec.tokens, dec.kv, readers)
        user = (req.session, req.agent)
        parts.segments.record_call(b.keys, wrote, user, readers, req.prompt.ids)
    with clock.stage("shadow"):
        fidelity = reference(parts, req, b.state, b.pre, dec.tokens)
    parts.learned.publish(req.scope)  # a pool that changed goes to the shared tier, if any
    stats = call_stats(
        engine.config.mode, req, b.pre, dec, b.ttft, decode_s, fidelity, clock.result()
    )
    engine.ledger.add(stats)
    return ChatResult(cut_at_stop(str(text), req.stop), dec.tokens, stats)
