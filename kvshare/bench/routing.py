"""``kvshare bench --workload routing``: a discrete-event simulation of W workflows over R
replicas under each routing policy (``kvshare.sched.routing``).

Trace: workflows arrive as a Poisson stream; each runs ``agents`` calls one after another.
Call k of workflow w reads its role's system prompt (role k, shared by every workflow), the
workflow's document and the outputs of calls 0..k-1, and writes ``out_tokens``. A replica
serves one call at a time in arrival order (batching is not modelled) and keeps the
segments it has read or written in an LRU cache of ``cache_tokens``; a call reuses every
segment its replica holds when it starts (kvshare relocates, so position does not matter)
and computes the rest. Service time: ``prefill_ms`` per computed token plus ``decode_ms`` per
output token (defaults: the embedded model on the CI kind of CPU, docs/results.md). The
arrival rate is set so that, without any reuse, replicas would be busy ``load`` of the
time. Affinity key: the workflow.

Per (R, policy): token reuse (reused / prompt tokens), load imbalance (max / mean over
replicas of the time-averaged requests queued or running) and the p50/p99 wait before a
call starts.
"""

from __future__ import annotations

import heapq
import random
import statistics
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import BaseModel

from kvshare.sched.routing import ROUTERS, Router

Segment = tuple[str, int, int]  # (kind, workflow or role, index)


@dataclass(frozen=True)
class Trace:
    """The simulated workload (see the module docstring); times in milliseconds."""

    workflows: int = 400
    agents: int = 5
    sys_tokens: int = 256
    doc_tokens: int = 1024
    out_tokens: int = 64
    prefill_ms: float = 1.5
    decode_ms: float = 30.0
    cache_tokens: int = 16_384
    load: float = 0.7
    seed: int = 0

    def call_segments(self, w: int, k: int) -> list[tuple[Segment, int]]:
        """What call k of workflow w reads: (segment, tokens)."""
        read = [(("sys", k, 0), self.sys_tokens), (("doc", w, 0), self.doc_tokens)]
        return read + [(("out", w, j), self.out_tokens) for j in range(k)]

    def bare_ms(self) -> float:
        """One workflow's service time with no reuse at all."""
        prompts = sum(sum(n for _, n in self.call_segments(0, k)) for k in range(self.agents))
        return prompts * self.prefill_ms + self.agents * self.out_tokens * self.decode_ms


class RoutingRow(BaseModel):
    replicas: int
    policy: str
    token_reuse: float
    imbalance: float
    p50_wait_ms: float
    p99_wait_ms: float


class _Replica:
    def __init__(self, cache_tokens: int) -> None:
        self.cache: OrderedDict[Segment, int] = OrderedDict()
        self.room = cache_tokens
        self.queue: deque[tuple[int, int, float]] = deque()  # (workflow, call, issued at)
        self.busy = False
        self.load, self.area, self.since = 0, 0.0, 0.0

    def hold(self, seg: Segment, tokens: int) -> None:
        """Keep ``seg`` as the most recent; evict the least recent beyond the room."""
        self.cache.pop(seg, None)
        self.cache[seg] = tokens
        while sum(self.cache.values()) > self.room and len(self.cache) > 1:
            self.cache.popitem(last=False)

    def count(self, now: float, delta: int) -> None:
        self.area += self.load * (now - self.since)
        self.load, self.since = self.load + delta, now


def simulate(trace: Trace, replicas: int, router: Router) -> RoutingRow:
    """One run of ``trace`` on ``replicas`` replicas routed by ``router``."""
    rng = random.Random(trace.seed)
    rate = trace.load * replicas / trace.bare_ms()  # workflows per ms
    reps = [_Replica(trace.cache_tokens) for _ in range(replicas)]
    events: list[tuple[float, int, str, int, int, int]] = []  # (t, seq, kind, w, k, replica)
    seq, t = 0, 0.0
    for w in range(trace.workflows):
        t += rng.expovariate(rate)
        events.append((t, seq, "issue", w, 0, -1))
        seq += 1
    heapq.heapify(events)
    reused = prompt = 0
    waits: list[float] = []

    def start(r: int, now: float) -> None:
        nonlocal seq, reused, prompt
        rep = reps[r]
        w, k, issued = rep.queue.popleft()
        rep.busy = True
        waits.append(now - issued)
        segs = trace.call_segments(w, k)
        hit = sum(n for s, n in segs if s in rep.cache)
        reused, prompt = reused + hit, prompt + sum(n for _, n in segs)
        computed = sum(n for _, n in segs) - hit
        done = now + computed * trace.prefill_ms + trace.out_tokens * trace.decode_ms
        heapq.heappush(events, (done, seq, "done", w, k, r))
        seq += 1

    while events:
        now, _, kind, w, k, r = heapq.heappop(events)
        if kind == "issue":
            r = router.choose(f"workflow-{w}", [rep.load for rep in reps])
            reps[r].count(now, +1)
            reps[r].queue.append((w, k, now))
            if not reps[r].busy:
                start(r, now)
            continue
        rep = reps[r]
        for seg, n in [*trace.call_segments(w, k), (("out", w, k), trace.out_tokens)]:
            rep.hold(seg, n)
        rep.busy = False
        rep.count(now, -1)
        if rep.queue:
            start(r, now)
        if k + 1 < trace.agents:
            heapq.heappush(events, (now, seq, "issue", w, k + 1, -1))
            seq += 1
    end = max(rep.since for rep in reps)
    areas = [rep.area + rep.load * (end - rep.since) for rep in reps]
    waits.sort()
    return RoutingRow(
        replicas=replicas,
        policy="",
        token_reuse=reused / max(1, prompt),
        imbalance=max(areas) / max(1e-9, statistics.mean(areas)),
        p50_wait_ms=waits[len(waits) // 2],
        p99_wait_ms=waits[min(len(waits) - 1, round(0.99 * (len(waits) - 1)))],
    )


def measure(trace: Trace, replicas: Sequence[int], policies: Sequence[str]) -> list[RoutingRow]:
    """A row per replica count and policy (each policy on the same trace)."""
    rows = []
    for n in replicas:
        for name in policies:
            row = simulate(trace, n, ROUTERS.create(name)(n))
            rows.append(row.model_copy(update={"policy": name}))
    return rows


def markdown(rows: Sequence[RoutingRow]) -> str:
    lines = [
        "| replicas | policy | token reuse | load imbalance (max/mean) | p50 / p99 wait (s) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.replicas} | {r.policy} | {r.token_reuse:.1%} | {r.imbalance:.2f} | "
            f"{r.p50_wait_ms / 1e3:.2f} / {r.p99_wait_ms / 1e3:.2f} |"
        )
    return "\n".join(lines) + "\n"
