"""``kvshare bench --workload tiers``: memory pressure, workflow-aware tiers vs LRU.

One workflow (the synthetic N-agent team, ``items`` inputs in a row, agents in a cycle) runs
under each policy on a fresh fork of one engine, same inputs, same order:

- ``workflow``: the device tier ranks segments by the steps-to-execution of the agents that
  use them (a registered cyclic order and a hint before every call) and prefetches the next
  agent's segments from the disk tier in the gap before its turn;
- ``lru``: the same tiers, least recently used first, no prefetch (a hierarchical cache);
- ``none``: ``full`` mode, no reuse.

The device tier gets a share (``fractions``) of the working set (every trace the run keeps,
measured in a first pass with no limit); below it a disk tier holds the rest (so nothing is
lost: both policies find the same KV and give the same outputs; what differs is how often a
call waits for a disk load). Reuse goes through the trace store only (radix prefix cache
off). ``gap_s`` models the time between two agents' turns (a tool, the runtime): prefetch
uses it, demand loads cannot. TTFT: mean and p95 over every call after the first item.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from tqdm.auto import tqdm

from kvshare.bench.workloads import SyntheticWorkload
from kvshare.engine import Engine
from kvshare.stats import CallStats

POLICIES = ("workflow", "lru", "none")


class TierRow(BaseModel):
    """One policy at one device-tier share of the working set."""

    policy: str
    fraction: float
    device_bytes: int
    mean_ttft_s: float
    p95_ttft_s: float
    token_reuse: float
    demand_misses: int
    prefetched: int
    moved_bytes: dict[str, int]
    evictions: int
    same_outputs: bool


class Timeline(BaseModel):
    """Calls (agent, start, end) and tier events (seconds from the run's start)."""

    calls: list[tuple[str, float, float]]
    events: list[tuple[str, float, str, str]]  # kind, at, src, dst


def _fork(base: Engine, policy: str, device_bytes: int, disk: str | None) -> Engine:
    if policy == "none":
        return base.fork(mode="full")
    return base.fork(
        mode="kvshare",
        prefix_cache_bytes=0,
        segment_store_bytes=device_bytes,
        disk_tier_dir=disk,
        eviction=policy,
        prefetch=policy == "workflow",
    )


def run_policy(
    base: Engine, wl: SyntheticWorkload, policy: str, device_bytes: int, gap_s: float
) -> tuple[Engine, list[CallStats], list[str], Timeline]:
    """The whole workflow under ``policy``; returns the engine, its calls, outputs, timeline."""
    disk = tempfile.mkdtemp(prefix="kvshare-tiers-") if policy != "none" else None
    engine = _fork(base, policy, device_bytes, disk)
    names = [wl.agent_name(i) for i in range(wl.n_agents)]
    engine.register_workflow(
        "bench", {a: [names[(i + 1) % len(names)]] for i, a in enumerate(names)}
    )
    calls, texts, spans = [], [], []
    t0 = time.monotonic()
    try:
        for item in range(wl.n_items):
            outputs: list[str] = []
            for i, name in enumerate(names):
                engine.hint("bench", running=name, next=[names[(i + 1) % len(names)]])
                start = time.monotonic() - t0
                r = engine.chat(
                    wl.messages(i, outputs, item),
                    agent=name,
                    session="bench",
                    max_new_tokens=wl.max_new_tokens,
                )
                spans.append((name, start, time.monotonic() - t0))
                outputs.append(r.text)
                calls.append(r.stats)
                texts.append(r.text)
                time.sleep(gap_s)  # the next agent's turn comes after a tool / the runtime
    finally:
        if disk is not None:
            shutil.rmtree(disk, ignore_errors=True)
    events = [
        (e.kind, e.at - t0, e.src or "", e.dst or "")
        for e in getattr(engine.segments, "events", [])
    ]
    return engine, calls, texts, Timeline(calls=spans, events=events)


def working_set(base: Engine, wl: SyntheticWorkload) -> int:
    """Bytes of every trace the workflow keeps, with no limit (the first pass)."""
    engine, _, _, _ = run_policy(base, wl, "workflow", 1 << 40, 0.0)
    return int(engine.segments.bytes_used)


def _row(
    policy: str,
    fraction: float,
    device: int,
    engine: Engine,
    calls: list[CallStats],
    same: bool,
    n_first: int,
) -> TierRow:
    later = [c.ttft_s for c in calls[n_first:]] or [c.ttft_s for c in calls]
    store = engine.segments
    prompt = sum(c.prompt_tokens for c in calls)
    computed = sum(c.computed_tokens for c in calls)
    moved = getattr(store, "moved_bytes", {})
    return TierRow(
        policy=policy,
        fraction=fraction,
        device_bytes=device,
        mean_ttft_s=statistics.fmean(later),
        p95_ttft_s=statistics.quantiles(later, n=20)[-1] if len(later) > 1 else later[0],
        token_reuse=1 - computed / prompt if prompt else 0.0,
        demand_misses=sum(getattr(store, "demand_misses", {}).values()),
        prefetched=engine.prefetcher.promoted if engine.prefetcher is not None else 0,
        moved_bytes={f"{a}->{b}": v for (a, b), v in moved.items()},
        evictions=getattr(store, "evictions", 0),
        same_outputs=same,
    )


def measure(
    base: Engine,
    wl: SyntheticWorkload,
    fractions: Sequence[float] = (0.25, 0.5, 1.0),
    gap_s: float = 0.05,
    progress: bool = True,
) -> tuple[int, list[TierRow], dict[float, Timeline]]:
    """Working set, one row per (fraction, policy), and the ``workflow`` timelines."""
    base.fork(mode="full").chat([{"role": "user", "content": "Hello"}], max_new_tokens=2)
    total = working_set(base, wl)
    rows, timelines = [], {}
    bar = tqdm(total=len(fractions) * len(POLICIES), desc="tiers", unit="run", disable=not progress)
    for fraction in fractions:
        device = max(1, int(fraction * total))
        reference: list[str] | None = None
        for policy in POLICIES:
            engine, calls, texts, timeline = run_policy(base, wl, policy, device, gap_s)
            reference = texts if reference is None else reference
            rows.append(
                _row(policy, fraction, device, engine, calls, texts == reference, wl.n_agents)
            )
            if policy == "workflow":
                timelines[fraction] = timeline
            if engine.prefetcher is not None:
                engine.prefetcher.close()
            bar.update()
    bar.close()
    return total, rows, timelines


def markdown(
    total: int, rows: list[TierRow], machine: str, over: str = "every call after the first item"
) -> str:
    lines = [
        f"Working set {total / 2**20:.0f} MiB of traces; device tier = share of it, disk tier "
        f"below. Machine: {machine}. TTFT over {over}.",
        "",
        "| device tier | policy | mean TTFT (s) | p95 TTFT (s) | vs LRU (mean) | token reuse | "
        "demand misses | prefetched | bytes moved (MiB) | same outputs as workflow |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lru = next(x for x in rows if x.fraction == r.fraction and x.policy == "lru")
        moved = ", ".join(f"{k} {v / 2**20:.0f}" for k, v in sorted(r.moved_bytes.items()))
        lines.append(
            f"| {r.fraction:.0%} | {r.policy} | {r.mean_ttft_s:.3f} | {r.p95_ttft_s:.3f} | "
            f"{lru.mean_ttft_s / r.mean_ttft_s:.2f}× | {r.token_reuse:.1%} | {r.demand_misses} | "
            f"{r.prefetched} | {moved or '–'} | {_same(r)} |"
        )
    return "\n".join(lines) + "\n"


def _same(row: TierRow) -> str:
    if row.policy == "none":
        return "– (full mode)"
    return "yes" if row.same_outputs else "no"


def plot_timeline(timeline: Timeline, path: Path, title: str) -> None:
    """Which agent ran when, and every tier event (prefetch, promote on demand, demote,
    evict, put) as markers per tier pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agents = list(dict.fromkeys(a for a, _, _ in timeline.calls))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for a, start, end in timeline.calls:
        ax.barh(agents.index(a), end - start, left=start, height=0.6, color="tab:blue", alpha=0.6)
    marks = {
        "prefetch": ("tab:green", "^"),
        "promote": ("tab:red", "v"),
        "demote": ("tab:orange", "x"),
    }
    marks["evict"] = ("black", "X")
    base = len(agents)
    for k, (kind, (color, marker)) in enumerate(marks.items()):
        xs = [at for e_kind, at, _, _ in timeline.events if e_kind == kind]
        if xs:
            ax.scatter(xs, [base + 0.5 + 0.4 * k] * len(xs), color=color, marker=marker, label=kind)
    ax.set_yticks(range(len(agents)))
    ax.set_yticklabels(agents)
    ax.set_xlabel("time since the run began (s)")
    ax.set_ylabel("agent (bars: its calls); markers: tier events")
    ax.set_title(title, fontsize=9)
    if any(e[0] in marks for e in timeline.events):
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class WarmRow(BaseModel):
    """One agent's first call with and without its static prompt precomputed."""

    agent: str
    prompt_tokens: int
    cold_ttft_s: float
    warm_ttft_s: float
    cold_reuse: float
    warm_reuse: float
    same_output: bool


def precompute_gain(base: Engine, wl: SyntheticWorkload, mode: str = "kvshare") -> list[WarmRow]:
    """The first item of ``wl`` twice on fresh forks: as is, and with every agent's system
    prompt precomputed (``Engine.precompute``, what the prefetcher does in the gap before an
    agent's turn; not timed) right before its call."""
    runs = {}
    for warm in (False, True):
        engine = base.fork(mode=mode)
        outputs: list[str] = []
        stats = []
        for i in range(wl.n_agents):
            msgs = wl.messages(i, outputs, 0)
            name = wl.agent_name(i)
            if warm:
                engine.precompute(msgs[:1], agent=name, session="bench")
            r = engine.chat(msgs, agent=name, session="bench", max_new_tokens=wl.max_new_tokens)
            outputs.append(r.text)
            stats.append(r)
        runs[warm] = stats
    return [
        WarmRow(
            agent=wl.agent_name(i),
            prompt_tokens=cold.stats.prompt_tokens,
            cold_ttft_s=cold.stats.ttft_s,
            warm_ttft_s=hot.stats.ttft_s,
            cold_reuse=cold.stats.reuse_rate,
            warm_reuse=hot.stats.reuse_rate,
            same_output=cold.text == hot.text,
        )
        for i, (cold, hot) in enumerate(zip(runs[False], runs[True], strict=True))
    ]


def warm_markdown(rows: list[WarmRow], mode: str) -> str:
    lines = [
        f"First call of each agent ({mode} mode), with and without its system prompt "
        "precomputed beforehand:",
        "",
        "| agent | prompt tokens | TTFT cold (s) | TTFT precomputed (s) | ratio | reuse cold | "
        "reuse precomputed | same output |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.agent} | {r.prompt_tokens} | {r.cold_ttft_s:.3f} | {r.warm_ttft_s:.3f} | "
            f"{r.warm_ttft_s / r.cold_ttft_s:.2f} | {r.cold_reuse:.0%} | {r.warm_reuse:.0%} | "
            f"{'yes' if r.same_output else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def team_pressure(
    base: Engine, team: Any, items: Sequence[Any], fraction: float = 0.25
) -> tuple[int, list[TierRow]]:
    """A reference team (wrapped LangGraph graph: its calls hint the engine) under memory
    pressure: the device tier at ``fraction`` of the team's working set, a disk tier below,
    workflow policy + prefetch vs LRU without prefetch, ``kvshare`` mode, radix cache off."""
    from kvshare.agents.teams.base import run_team

    def fork(policy: str, device: int, disk: str | None) -> Engine:
        return _fork(base, policy, device, disk)

    probe = fork("workflow", 1 << 40, None)
    run_team(probe, team, items)
    total = int(probe.segments.bytes_used)
    device = max(1, int(fraction * total))
    rows, reference = [], None
    for policy in ("workflow", "lru"):
        disk = tempfile.mkdtemp(prefix="kvshare-team-tiers-")
        try:
            engine = fork(policy, device, disk)
            run = run_team(engine, team, items)
        finally:
            shutil.rmtree(disk, ignore_errors=True)
        reference = run.answers if reference is None else reference
        calls = list(run.calls)
        rows.append(_row(policy, fraction, device, engine, calls, run.answers == reference, 0))
        if engine.prefetcher is not None:
            engine.prefetcher.close()
    return total, rows
