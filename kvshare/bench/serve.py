"""``kvshare bench --workload serve``: the HTTP server against the engine it serves, in one
process (the server on a loopback port in a thread, clients in threads).

Overhead: the same 1-token, non-streaming call, alternately through ``POST
/v1/chat/completions`` (an ``httpx`` client with keep-alive) and ``Engine.achat`` directly
(a private event loop); medians of each and their difference (the client's own cost
included). Load: C clients at once, each sending R streamed requests one after another
(every request its own question over a shared text, greedy), against the same requests
replayed one at a time through ``Engine.chat`` on a fresh engine of the same mode: errors,
replies that differ from the replay, p50/p99 TTFT at the client (to the first text chunk)
and generated tokens per second over the wall time.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import httpx
from pydantic import BaseModel

from kvshare.bench.corpus import long_text
from kvshare.engine.engine import Engine


class OverheadRow(BaseModel):
    calls: int
    http_median_ms: float
    direct_median_ms: float
    overhead_ms: float
    paired_ms: float = 0.0  # median of the per-pair differences (HTTP minus direct)


class LoadRow(BaseModel):
    clients: int
    requests: int
    errors: int
    mismatches: int
    p50_ttft_s: float
    p99_ttft_s: float
    tok_s: float
    wall_s: float


@contextmanager
def serving(engine: Engine) -> Iterator[str]:
    """``engine`` behind a no-auth server on a free loopback port; yields its base URL."""
    from kvshare.serve import ServeConfig
    from kvshare.serve.run import free_port, make_server

    port = free_port()
    config = ServeConfig(max_concurrent=1 << 10, max_queued_prompt_tokens=1 << 30)
    server = make_server(engine, config, "127.0.0.1", port)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the bench server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def questions(engine: Engine, n: int, doc_tokens: int = 192) -> list[list[dict[str, str]]]:
    """n prompts: one shared passage, each its own question (the prefix is shared)."""
    ids = engine.tokenizer.encode(long_text(), add_special_tokens=False)[:doc_tokens]
    doc = engine.tokenizer.decode(ids)
    return [
        [{"role": "system", "content": "Answer from the passage."},
         {"role": "user", "content": f"{doc}\n\nQuestion {i}: what happens in part {i % 7}?"}]
        for i in range(n)
    ]  # fmt: skip


def measure_overhead(engine: Engine, calls: int) -> OverheadRow:
    """Median per-call time through HTTP and directly, interleaved (1 token, same prompt)."""
    msgs = questions(engine, 1)[0]
    loop = asyncio.new_event_loop()
    http_s, direct_s = [], []
    with serving(engine) as base, httpx.Client(base_url=base, timeout=120) as client:
        model = client.get("/v1/models").json()["data"][0]["id"]
        body = {"model": model, "messages": msgs, "max_tokens": 1, "temperature": 0}
        for i in range(calls + 2):  # the first two warm both paths up
            t0 = time.perf_counter()
            r = client.post("/v1/chat/completions", json=body)
            t1 = time.perf_counter()
            loop.run_until_complete(engine.achat(msgs, max_new_tokens=1, tenant="local"))
            t2 = time.perf_counter()
            r.raise_for_status()
            if i >= 2:
                http_s.append(t1 - t0)
                direct_s.append(t2 - t1)
    loop.close()
    h, d = statistics.median(http_s) * 1e3, statistics.median(direct_s) * 1e3
    paired = statistics.median(a - b for a, b in zip(http_s, direct_s, strict=True)) * 1e3
    return OverheadRow(calls=calls, http_median_ms=h, direct_median_ms=d, overhead_ms=h - d,
                       paired_ms=paired)  # fmt: skip


def _stream(client: httpx.Client, body: dict[str, Any]) -> tuple[str, float, int]:
    """(reply text, seconds to its first text chunk, completion tokens) of one request."""
    t0, ttft, parts, tokens = time.perf_counter(), 0.0, [], 0
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event["choices"]:
                if choice["delta"].get("content"):
                    ttft = ttft or time.perf_counter() - t0
                    parts.append(choice["delta"]["content"])
    return "".join(parts), ttft, tokens


def measure_load(
    engine: Engine, clients: int, requests: int, new_tokens: int, expected: Sequence[str]
) -> LoadRow:
    """``clients`` threads × ``requests`` streamed requests against a fork of ``engine``;
    replies compared with ``expected`` (request i of client c is prompt c * requests + i)."""
    prompts = questions(engine, clients * requests)
    errors, mismatches, ttfts, tokens = 0, 0, [], 0
    lock = threading.Lock()
    with serving(engine.fork()) as base:
        model = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]

        def client_run(c: int) -> None:
            nonlocal errors, mismatches, tokens
            with httpx.Client(base_url=base, timeout=600) as client:
                for i in range(c * requests, (c + 1) * requests):
                    body = {"model": model, "messages": prompts[i], "max_tokens": new_tokens,
                            "temperature": 0, "stream": True,
                            "stream_options": {"include_usage": True}}  # fmt: skip
                    try:
                        text, ttft, n = _stream(client, body)
                    except (httpx.HTTPError, RuntimeError):
                        with lock:
                            errors += 1
                        continue
                    with lock:
                        mismatches += text != expected[i]
                        ttfts.append(ttft)
                        tokens += n

        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(client_run, range(clients)))
        wall = time.perf_counter() - t0
    q = statistics.quantiles(ttfts, n=100, method="inclusive") if len(ttfts) > 1 else ttfts * 99
    return LoadRow(clients=clients, requests=clients * requests, errors=errors,
                   mismatches=mismatches, p50_ttft_s=q[49], p99_ttft_s=q[98],
                   tok_s=tokens / wall, wall_s=wall)  # fmt: skip


def serial_replies(engine: Engine, n: int, new_tokens: int) -> list[str]:
    """The first n prompts' replies one at a time on a fresh fork (greedy)."""
    fresh = engine.fork()
    return [
        fresh.chat(m, max_new_tokens=new_tokens, tenant="local").text for m in questions(engine, n)
    ]


def markdown(overhead: OverheadRow, rows: Sequence[LoadRow]) -> str:
    lines = [
        f"HTTP overhead over Engine.achat (median of {overhead.calls}, 1-token replies, "
        f"non-streaming): {overhead.http_median_ms:.2f} ms through HTTP, "
        f"{overhead.direct_median_ms:.2f} ms direct, **{overhead.overhead_ms:.2f} ms**; "
        f"median of the per-pair differences **{overhead.paired_ms:.2f} ms**\n",
        "| clients | requests | errors | mismatches vs serial | p50 / p99 TTFT (s) | tokens/s "
        "| wall (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.clients} | {r.requests} | {r.errors} | {r.mismatches} | "
            f"{r.p50_ttft_s:.3f} / {r.p99_ttft_s:.3f} | {r.tok_s:.1f} | {r.wall_s:.1f} |"
        )
    return "\n".join(lines) + "\n"
