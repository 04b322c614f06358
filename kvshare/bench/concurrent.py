"""``kvshare bench --workload concurrent``: N streams at once against the same N calls one
at a time, in one process.

Each stream is one call: its own short question over the shared long text (a different
slice per stream), ``max_new_tokens`` of reply, from its own thread, all released together.
Per stream count: wall time, generated tokens per second end to end, the steady decode
rate (tokens per second while all N streams decode: after the last stream's first token,
until the first stream's last; serially: tokens after the first over decode seconds), p50/p99
TTFT, the decoder's mean batch, the longest stall between two tokens of one stream
(a prefill holding every decode) and a decode step's median batched forward and time
outside it (the batcher's own: admission, sampling, handing tokens over), concurrent and
serial side by side (the serial run is the same calls, same engine config, one after
another).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import BaseModel

from kvshare.bench.corpus import long_text
from kvshare.engine.engine import Engine
from kvshare.engine.results import ChatResult


class ConcurrentRow(BaseModel):
    """One stream count: ``*_s`` seconds, ``tok_s`` generated tokens per second overall."""

    streams: int
    mode: str
    chunk: int = 0  # prefill_chunk_tokens of the together run (0: whole prefills)
    every_ms: float = 0.0  # decode_every_ms of the together run (0: off)
    tokens: float
    wall_s: float
    serial_wall_s: float
    tok_s: float
    serial_tok_s: float
    decode_tok_s: float
    serial_decode_tok_s: float
    p50_ttft_s: float
    p99_ttft_s: float
    serial_p50_ttft_s: float
    mean_batch: float
    max_stall_s: float = 0.0  # longest gap between two tokens of one stream, together
    forward_ms: float = 0.0  # median batched forward per decode step, together
    host_ms: float = 0.0  # median time of a decode step outside its forward, together


def _messages(engine: Engine, ids: list[int], i: int, prompt_tokens: int) -> list[dict]:
    """Stream i's prompt: ~``prompt_tokens`` of the shared text ``ids`` from its own offset."""
    start = (i * 97) % max(1, len(ids) - prompt_tokens)
    text = engine.tokenizer.decode(ids[start : start + prompt_tokens])
    return [{"role": "system", "content": "Summarise the passage in detail."},
            {"role": "user", "content": text}]  # fmt: skip


def _run(engine: Engine, msgs: Sequence[list[dict[str, str]]], new: int, together: bool):
    """(results, wall seconds, per stream the times its tokens arrived)."""
    times: list[list[float]] = [[] for _ in msgs]

    def one(i: int) -> ChatResult:
        if together:
            gate.wait()
        return engine.chat(msgs[i], agent=f"a{i}", session=f"s{i}", max_new_tokens=new,
                           on_token=lambda _: times[i].append(time.perf_counter()))  # fmt: skip

    gate = threading.Barrier(len(msgs))
    t0 = time.perf_counter()
    if together:
        with ThreadPoolExecutor(len(msgs)) as pool:
            out = list(pool.map(one, range(len(msgs))))
    else:
        out = [one(i) for i in range(len(msgs))]
    return out, time.perf_counter() - t0, times


def steady_rate(times: list[list[float]]) -> float:
    """Tokens per second while every stream decodes: after the last stream's first token,
    until the first stream's last one."""
    start = max(t[0] for t in times if t)
    end = min(t[-1] for t in times if t)
    n = sum(1 for ts in times for t in ts if start < t <= end)
    return n / (end - start) if end > start else 0.0


def _stall(ts: list[float]) -> float:
    """The longest gap between two consecutive tokens of one stream (0: fewer than two)."""
    return max((b - a for a, b in zip(ts, ts[1:], strict=False)), default=0.0)


def _p(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def measure(
    base: Engine,
    streams: Sequence[int] = (1, 2, 4, 8),
    mode: str = "full",
    new_tokens: int = 64,
    prompt_tokens: int = 128,
    repeats: int = 1,
    variants: Sequence[tuple[int, float]] = ((0, 0.0),),
) -> list[ConcurrentRow]:
    """The rows, one per stream count and variant of the together run (its
    ``prefill_chunk_tokens``, ``decode_every_ms``; one at a time always runs plain); each
    figure the median of ``repeats`` runs (serial and each together run alternating, fresh
    engines each time)."""
    ids = base.tokenizer(long_text())["input_ids"]
    rows = []
    for n in streams:
        msgs = [_messages(base, ids, i, prompt_tokens) for i in range(n)]
        runs = [_once(base, msgs, mode, new_tokens, variants) for _ in range(repeats)]
        for c, (chunk, every) in enumerate(variants):
            med = {k: statistics.median(r[c][k] for r in runs) for k in runs[0][c]}
            rows.append(ConcurrentRow(streams=n, mode=mode, chunk=chunk, every_ms=every, **med))
    return rows


def _once(
    base: Engine,
    msgs: list[list[dict]],
    mode: str,
    new: int,
    variants: Sequence[tuple[int, float]],
) -> list[dict[str, Any]]:
    """One serial run and, per variant, one together run: their figures."""
    serial, serial_wall, _ = _run(base.fork(mode=mode), msgs, new, together=False)
    forks = [base.fork(mode=mode, prefill_chunk_tokens=c, decode_every_ms=e) for c, e in variants]
    return [_together(eng, msgs, new, serial, serial_wall) for eng in forks]


def _together(
    eng: Engine, msgs: list[list[dict]], new: int, serial: list[ChatResult], serial_wall: float
) -> dict[str, Any]:
    out, wall, times = _run(eng, msgs, new, together=True)
    tokens = sum(len(r.tokens) for r in out)
    ttft = [r.stats.ttft_s for r in out]
    rates = [(len(r.tokens) - 1, r.stats.decode_tok_s) for r in serial if r.stats.decode_tok_s]
    decode_s = sum(n / rate for n, rate in rates)
    return {
        "tokens": tokens,
        "wall_s": wall,
        "serial_wall_s": serial_wall,
        "tok_s": tokens / wall,
        "serial_tok_s": sum(len(r.tokens) for r in serial) / serial_wall,
        "decode_tok_s": steady_rate(times),
        "serial_decode_tok_s": sum(len(r.tokens) - 1 for r in serial) / max(decode_s, 1e-9),
        "p50_ttft_s": statistics.median(ttft),
        "p99_ttft_s": _p(ttft, 0.99),
        "serial_p50_ttft_s": statistics.median(r.stats.ttft_s for r in serial),
        **_step_times(eng),
        "max_stall_s": max((_stall(ts) for ts in times), default=0.0),
    }


def _step_times(eng: Engine) -> dict[str, float]:
    """The together run's mean decode batch and median forward / outside-forward step ms."""
    if eng.batcher is None:
        return {"mean_batch": 1.0}
    st = eng.batcher.stats()
    return {k: st[k] for k in ("mean_batch", "forward_ms", "host_ms")}


def markdown(rows: Sequence[ConcurrentRow]) -> str:
    lines = [
        "| streams | mode | together: prefill chunk / decode_every_ms | tokens | "
        "wall together / one at a time (s) | "
        "tokens/s together / one at a time | × | steady decode tokens/s together / one at a "
        "time | × | p50 / p99 TTFT together (s) | p50 TTFT one at a time (s) | "
        "mean decode batch | longest stall (s) | "
        "step: forward / outside it (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.streams} | {r.mode} | {r.chunk or 'whole'} / {r.every_ms:g} | {r.tokens:.0f} | "
            f"{r.wall_s:.2f} / {r.serial_wall_s:.2f} | "
            f"{r.tok_s:.1f} / {r.serial_tok_s:.1f} | {r.tok_s / r.serial_tok_s:.2f}× | "
            f"{r.decode_tok_s:.1f} / {r.serial_decode_tok_s:.1f} | "
            f"{r.decode_tok_s / r.serial_decode_tok_s:.2f}× | "
            f"{r.p50_ttft_s:.3f} / {r.p99_ttft_s:.3f} | {r.serial_p50_ttft_s:.3f} | "
            f"{r.mean_batch:.2f} | {r.max_stall_s:.2f} | {r.forward_ms:.1f} / {r.host_ms:.2f} |"
        )
    return "\n".join(lines) + "\n"
