"""``kvshare bench --workload redis-faults``: two replicas that share only a real Redis server,
with faults injected into what they share.

Each round runs one workflow item (``SyntheticWorkload``): a fresh engine A (a fork: empty
stores) runs agents 0..n-2, faults are injected into the server, then a fresh engine B runs
agent n-1 (shadowed: its KL against a full prefill). Faults, cycled over the stored entries
(the round's own first): ``flip`` (one byte), ``truncate``, ``resum`` (a flipped byte under a
recomputed sha256), ``tenant`` (another tenant's valid entry of the same content under this
key), ``model`` (another model's valid entry under this key), and every ``restart_every``
rounds a ``restart`` (the server killed before A's second call and started again, empty, after
it). The first ``clean`` rounds
inject nothing: B's reuse there is the clean reuse figure.

Counted: calls that raised (failed), and wrong KV served: any segment the shared tier handed
B whose tokens or KV bytes no engine wrote under its key (a ledger of every write-through).
"""

from __future__ import annotations

import hashlib
import random
import statistics
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from kvshare.bench.corpus import long_text
from kvshare.bench.local_redis import LocalRedis
from kvshare.bench.workloads import SyntheticWorkload
from kvshare.errors import StateFileError
from kvshare.scope import Scope
from kvshare.store.contract import StoredSegment
from kvshare.store.identity import KVIdentity
from kvshare.store.redis_tier import RedisTier
from kvshare.store.seal import Sealer

FAULTS = ("flip", "truncate", "resum", "tenant", "model")


@dataclass
class FaultReport:
    """What one run counted; reuse figures are B's reuse rate (prompt tokens not computed)."""

    model: str
    rounds: int
    calls: int = 0
    failed_calls: int = 0
    wrong_kv_served: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    tier: dict[str, int] = field(default_factory=dict)  # B's shared-tier counters, summed
    clean_reuse: list[float] = field(default_factory=list)
    faulty_reuse: list[float] = field(default_factory=list)
    local_reuse: list[float] = field(default_factory=list)  # the last agent on A itself
    kl: list[float] = field(default_factory=list)
    top1: list[bool] = field(default_factory=list)

    @property
    def injected(self) -> int:
        return sum(self.faults.values())

    def summary(self) -> dict[str, Any]:
        def med(xs: list[float]) -> float | None:
            return statistics.median(xs) if xs else None

        return {
            **{k: v for k, v in asdict(self).items() if k not in ("kl", "top1")},
            "injected": self.injected, "clean_reuse_median": med(self.clean_reuse),
            "faulty_reuse_median": med(self.faulty_reuse),
            "local_reuse_median": med(self.local_reuse), "kl_max": max(self.kl, default=None),
            "kl_median": med(self.kl), "top1_rate": sum(self.top1) / max(len(self.top1), 1),
        }  # fmt: skip


def _digest(seg: StoredSegment) -> tuple[tuple[int, ...], str]:
    h = hashlib.sha256()
    for t in (seg.kv.keys, seg.kv.values):
        h.update(t.detach().cpu().contiguous().reshape(-1).view(-1).numpy().tobytes())
    return seg.tokens, h.hexdigest()


class Ledger:
    """Every segment written through (key -> accepted (tokens, KV digest)), and the check of
    every segment served against it."""

    def __init__(self) -> None:
        self.written: dict[Any, set[tuple[tuple[int, ...], str]]] = {}
        self.wrong = 0
        self.fresh: list[Any] = []  # keys written this round

    def watch_writes(self, tier: RedisTier) -> None:
        put = tier.put

        def recorded(seg: StoredSegment) -> bool:
            self.written.setdefault(seg.key, set()).add(_digest(seg))
            self.fresh.append(seg.key)
            return put(seg)

        setattr(tier, "put", recorded)  # noqa: B010 (instrumented instance)

    def watch_reads(self, tier: RedisTier) -> None:
        fetch = tier.fetch

        def checked(keys: Any) -> list[StoredSegment | None]:
            out = fetch(keys)
            for seg in out:
                if seg is not None and _digest(seg) not in self.written.get(seg.key, ()):
                    self.wrong += 1
            return out

        setattr(tier, "fetch", checked)  # noqa: B010 (instrumented instance)


class Injector:
    """Applies faults to the entries on ``server`` (``tier``: the replicas' model and secret)."""

    def __init__(self, server: LocalRedis, tier: RedisTier, seed: int = 0) -> None:
        self.server, self.tier, self.raw = server, tier, server.client()
        self.rng = random.Random(seed)
        other = replace(tier.identity, weights="0" * 32)
        self.foreign_model = RedisTier(server.url, other, tier.sealer)

    def inject(self, keys: list[Any], n: int, counts: dict[str, int]) -> None:
        """Up to ``n`` faults, one per *valid* stored entry of ``keys`` (in order: an entry
        already faulty, evicted or deleted by a check is skipped), each counted under its
        kind (random)."""
        done = 0
        for key in dict.fromkeys(keys):
            kind = FAULTS[self.rng.randrange(len(FAULTS))]
            if done < n and self._apply(key, kind):
                counts[kind] = counts.get(kind, 0) + 1
                done += 1

    def _apply(self, key: Any, kind: str) -> bool:
        """Turn the valid entry of ``key`` into a faulty one of ``kind`` (False: none valid)."""
        name = self.tier.entry_key(key)
        value = self.raw.get(name)
        try:
            seg = self.tier.verify(key, value)
        except (StateFileError, ValueError, TypeError, RuntimeError):
            return False  # already faulty
        if seg is None or value is None:
            return False
        if kind in ("flip", "resum"):
            body = bytearray(value)
            at = self.rng.randrange(64 if kind == "flip" else 64 + 8, len(body))
            body[at] ^= 1 << self.rng.randrange(8)
            if kind == "resum":
                body[:64] = hashlib.sha256(bytes(body[64:])).hexdigest().encode()
            value = bytes(body)
        elif kind == "truncate":
            value = value[: self.rng.randrange(1, len(value))]
        else:
            value = self._foreign(seg, kind)
        self.raw.set(name, value)
        return True

    def _foreign(self, seg: StoredSegment, kind: str) -> bytes:
        """A valid entry of ``seg``'s content for another model or tenant (kept by NX)."""
        if kind == "model":
            self.foreign_model.put(seg)
            return bytes(self.raw.get(self.foreign_model.entry_key(seg.key)))
        intruder = replace(seg, scope=Scope("tenant", "intruder", None))
        self.tier.put(intruder)
        return bytes(self.raw.get(self.tier.entry_key(intruder.key)))


def _replica(base: Any, url: str, key_file: str) -> Any:
    return base.fork(
        mode="kvshare", prefix_cache_bytes=0, shared_tier=url, shared_key_file=key_file
    )


@dataclass
class _Run:
    """One run's parts; ``round(r)`` runs workflow round ``r`` (module docs)."""

    base: Any
    work: SyntheticWorkload
    server: LocalRedis
    key_file: str
    report: FaultReport
    injector: Injector
    faults_per_round: int
    clean: int
    restart_every: int
    ledger: Ledger = field(default_factory=Ledger)

    def replicas(self) -> tuple[Any, Any]:
        pair = tuple(_replica(self.base, self.server.url, self.key_file) for _ in "ab")
        for e in pair:
            self.ledger.watch_reads(e.segments.shared)
            self.ledger.watch_writes(e.segments.shared)
        return pair

    def round(self, r: int) -> None:
        (a, b), rep, last = self.replicas(), self.report, self.work.n_agents - 1
        faulted, every = r >= self.clean, self.restart_every
        restart = faulted and every > 0 and (r - self.clean) % every == every - 1
        item, outputs = r % self.work.n_items, list[str]()
        for i in range(last):
            if restart and i == 1:  # mid-workflow: agent 1 runs while the server is down
                self.server.stop()
                rep.faults["restart"] = rep.faults.get("restart", 0) + 1
            res = _call(a, self.work, i, outputs, item, rep)
            outputs.append("" if res is None else res.text)
            if self.server.proc is None:
                self.server.start()  # back, empty
        if faulted:
            keys = [*self.ledger.fresh, *self.ledger.written]
            self.injector.inject(keys, self.faults_per_round, rep.faults)
        self.ledger.fresh.clear()
        res = _call(b, self.work, last, outputs, item, rep, shadow=True)
        if res is not None:
            (rep.faulty_reuse if faulted else rep.clean_reuse).append(res.stats.reuse_rate)
            rep.kl.append(res.stats.kl or 0.0)
            rep.top1.append(bool(res.stats.top1_agree))
        if not faulted:  # the same call on A, which ran the earlier agents itself
            same = _call(a, self.work, last, outputs, item, rep)
            rep.local_reuse.append(0.0 if same is None else same.stats.reuse_rate)
        for e in (a, b):
            for k, v in e.segments.shared.stats().items():
                rep.tier[k] = rep.tier.get(k, 0) + v


def measure(
    base: Any,
    rounds: int = 100,
    faults_per_round: int = 8,
    clean: int = 3,
    restart_every: int = 10,
    agents: int = 3,
    prefix_len: int = 32,
    input_len: int = 256,
    output_len: int = 8,
) -> FaultReport:
    """Run ``rounds`` workflow items on replicas A and B forked from ``base`` (module docs)."""
    work = SyntheticWorkload(base.loaded.tokenizer, long_text(), n_agents=agents,
                             prefix_len=prefix_len, input_len=input_len, output_len=output_len,
                             n_items=min(rounds, 8))  # fmt: skip
    report = FaultReport(str(base.loaded.source), rounds)
    key_file = str(Path(tempfile.mkdtemp(prefix="kvshare-faults-")) / "shared.key")
    with LocalRedis(maxmemory="1gb") as server:  # room for every item's traces
        tier = RedisTier(server.url, KVIdentity.of(base.model), Sealer.at(key_file))
        run = _Run(base, work, server, key_file, report, Injector(server, tier),
                   faults_per_round, clean, restart_every)  # fmt: skip
        for r in range(rounds):
            run.round(r)
    report.wrong_kv_served = run.ledger.wrong
    return report


def _call(
    engine: Any, work: SyntheticWorkload, i: int, outputs: list[str], item: int,
    report: FaultReport, shadow: bool = False,
) -> Any:  # fmt: skip
    """Agent ``i``'s call of workflow ``item`` (None, counted in failed_calls, if it raised)."""
    report.calls += 1
    try:
        return engine.chat(
            work.messages(i, outputs, item), agent=work.agent_name(i), tenant="bench",
            max_new_tokens=work.max_new_tokens, shadow=shadow,
        )  # fmt: skip
    except Exception:  # a failed call is what this bench counts
        report.failed_calls += 1
        return None


def markdown(rep: FaultReport) -> str:
    """The report as a markdown table."""
    s = rep.summary()
    pct = lambda x: "—" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    faults = ", ".join(f"{k} {v}" for k, v in sorted(rep.faults.items()))
    tier = ", ".join(f"{k} {v}" for k, v in sorted(rep.tier.items()))
    rows = [
        ("calls", rep.calls), ("failed calls", rep.failed_calls),
        ("wrong KV served", rep.wrong_kv_served), ("faults injected", f"{rep.injected} ({faults})"),
        ("B's shared tier (summed)", tier),
        ("B's reuse, clean rounds (median)", pct(s["clean_reuse_median"])),
        ("the same call on A itself, clean rounds (median)", pct(s["local_reuse_median"])),
        ("B's reuse, faulted rounds (median)", pct(s["faulty_reuse_median"])),
        ("B vs full prefill: KL median / max", f"{s['kl_median']:.2e} / {s['kl_max']:.2e}"),
        ("B vs full prefill: top-1 agreement", pct(s["top1_rate"])),
    ]  # fmt: skip
    return "\n".join(
        ["| redis-faults | value |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)]
    )
