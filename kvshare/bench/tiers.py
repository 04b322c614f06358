"""``kvshare bench --workload tiers``: memory pressure, workflow-aware tiers vs LRU.

One workflow (the synthetic N-agent team, ``items`` inputs in a row, agents in a cycle) runs
under each policy on a fresh fork of one engine, same inputs, same order:

- ``workflow``: the device tier ranks segments by the steps-to-execution of the agents that
  use them (a registered cyclic order and a hint before every call), cuts a trace only its
  writer still needs to the head that writer reads again (``kvshare.store.trim``), and prefetches
  the next agent's segments from the disk tier in the gap after the running agent's call;
- ``lru``: the same tiers, least recently used first, whole traces, no prefetch (a
  hierarchical cache);
- ``none``: ``full`` mode, no reuse.

The working set is what one cycle of the workflow reads back: the largest number of trace
bytes written by any ``n_agents`` consecutive calls, measured in a first pass with no limit
(every agent's latest trace: its own prefix for its next turn, the shared input and the
replies for the agents after it). The device tier gets a share (``fractions``) of it. Below
it (``lowers``) either a disk tier holds the rest (nothing is lost: a miss is a disk load,
both policies give the same outputs) or nothing (a segment pushed out of the device tier is
gone: a miss is a recompute, which also changes what the call reuses). Reuse goes through the
trace store only (radix prefix cache off). ``gap_s`` models the time between two agents'
turns (a tool, the runtime): prefetch uses it, demand loads cannot. TTFT: mean and p95 over
every call after the first item.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel
from tqdm.auto import tqdm

from kvshare.bench.precompute import WarmRow, precompute_gain, warm_markdown
from kvshare.bench.workloads import SyntheticWorkload
from kvshare.engine.engine import Engine
from kvshare.engine.stats import CallStats

__all__ = [
    "LOWERS",
    "POLICIES",
    "TierRow",
    "Timeline",
    "WarmRow",
    "cycle_bytes",
    "markdown",
    "measure",
    "plot_timeline",
    "policy_engine",
    "precompute_gain",
    "run_policy",
    "tier_row",
    "warm_markdown",
    "working_set",
]

POLICIES = ("workflow", "lru")
LOWERS = ("disk", "none")


class TierRow(BaseModel):
    """One policy at one device-tier share of the working set, over one lower tier
    (``disk`` or ``none``; ``-`` for the no-reuse row)."""

    policy: str
    lower: str = "disk"
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
    trims: int = 0


class Timeline(BaseModel):
    """Calls (agent, start, end) and tier events (seconds from the run's start)."""

    calls: list[tuple[str, float, float]]
    events: list[tuple[str, float, str, str]]  # kind, at, src, dst
    held: list[int] = []  # trace bytes the store held after each call


def policy_engine(base: Engine, policy: str, device_bytes: int, disk: str | None) -> Engine:
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
    base: Engine,
    wl: SyntheticWorkload,
    policy: str,
    device_bytes: int,
    gap_s: float,
    lower: str = "disk",
) -> tuple[Engine, list[CallStats], list[str], Timeline]:
    """The whole workflow under ``policy`` (``workflow``, ``lru`` or ``none``) with ``lower``
    (``disk`` or ``none``) below the device tier; returns the engine, its calls, outputs,
    timeline. The timeline's calls are (agent, start, end) and also give, per call, the trace
    bytes the store held after it (``held``)."""
    use_disk = policy != "none" and lower == "disk"
    disk = tempfile.mkdtemp(prefix="kvshare-tiers-") if use_disk else None
    engine = policy_engine(base, policy, device_bytes, disk)
    names = [wl.agent_name(i) for i in range(wl.n_agents)]
    engine.register_workflow(
        "bench", {a: [names[(i + 1) % len(names)]] for i, a in enumerate(names)}
    )
    calls, texts, spans, held = [], [], [], []
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
                held.append(int(engine.segments.bytes_used))
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
    return engine, calls, texts, Timeline(calls=spans, events=events, held=held)


def cycle_bytes(held: Sequence[int], cycle: int) -> int:
    """The most bytes written by any ``cycle`` consecutive calls, from the bytes a store with
    no limit held after each call (it only grows)."""
    after = [0, *held]
    return max(after[i + cycle] - after[i] for i in range(max(1, len(held) - cycle + 1)))


def working_set(base: Engine, wl: SyntheticWorkload) -> int:
    """Bytes one cycle of the workflow reads back (see the module doc), from a first pass with
    no limit."""
    _, _, _, timeline = run_policy(base, wl, "workflow", 1 << 40, 0.0, lower="none")
    return cycle_bytes(timeline.held, wl.n_agents)


def tier_row(
    policy: str,
    fraction: float,
    device: int,
    engine: Engine,
    calls: list[CallStats],
    same: bool,
    n_first: int,
    lower: str = "disk",
) -> TierRow:
    later = [c.ttft_s for c in calls[n_first:]] or [c.ttft_s for c in calls]
    store = engine.segments
    prompt = sum(c.prompt_tokens for c in calls)
    computed = sum(c.computed_tokens for c in calls)
    moved = getattr(store, "moved_bytes", {})
    return TierRow(
        policy=policy,
        lower=lower if policy != "none" else "-",
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
        trims=getattr(store, "trims", 0),
    )


def measure(
    base: Engine,
    wl: SyntheticWorkload,
    fractions: Sequence[float] = (0.25, 0.5, 1.0),
    gap_s: float = 0.05,
    progress: bool = True,
    lowers: Sequence[str] = LOWERS,
) -> tuple[int, list[TierRow], dict[float, Timeline]]:
    """Working set, one row per (fraction, lower tier, policy) plus one ``none`` row per
    fraction, and the ``workflow`` timelines over the first of ``lowers``. Outputs are
    compared with the workflow policy's over the same lower tier."""
    base.fork(mode="full").chat([{"role": "user", "content": "Hello"}], max_new_tokens=2)
    total = working_set(base, wl)
    runs = [(lower, policy) for lower in lowers for policy in POLICIES] + [("-", "none")]
    rows, timelines = [], {}
    bar = tqdm(total=len(fractions) * len(runs), desc="tiers", unit="run", disable=not progress)
    for fraction in fractions:
        device = max(1, int(fraction * total))
        reference: dict[str, list[str]] = {}
        for lower, policy in runs:
            engine, calls, texts, timeline = run_policy(base, wl, policy, device, gap_s, lower)
            same = texts == reference.setdefault(lower, texts)
            rows.append(tier_row(policy, fraction, device, engine, calls, same, wl.n_agents, lower))
            if policy == "workflow" and lower == lowers[0]:
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
        f"Working set {total / 2**20:.0f} MiB of traces; device tier = share of it, below it "
        f"a disk tier or nothing. Machine: {machine}. TTFT over {over}.",
        "",
        "| device tier | below | policy | mean TTFT (s) | p95 TTFT (s) | vs LRU (mean) | "
        "token reuse | demand misses | prefetched | evicted | cut to heads | bytes moved (MiB) | "
        "same outputs as workflow |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lru = sorted(  # the LRU row over the same lower tier (any, for the no-reuse row)
            (x for x in rows if x.fraction == r.fraction and x.policy == "lru"),
            key=lambda x: x.lower != r.lower,
        )
        ratio = f"{lru[0].mean_ttft_s / r.mean_ttft_s:.2f}×" if lru else "–"
        moved = ", ".join(f"{k} {v / 2**20:.0f}" for k, v in sorted(r.moved_bytes.items()))
        lines.append(
            f"| {r.fraction:.0%} | {r.lower} | {r.policy} | {r.mean_ttft_s:.3f} | "
            f"{r.p95_ttft_s:.3f} | {ratio} | {r.token_reuse:.1%} | {r.demand_misses} | "
            f"{r.prefetched} | {r.evictions} | {r.trims} | {moved or '–'} | {_same(r)} |"
        )
    return "\n".join(lines) + "\n"


def _same(row: TierRow) -> str:
    if row.policy == "none":
        return "– (full mode)"
    return "yes" if row.same_outputs else "no"


def plot_timeline(timeline: Timeline, path: Path, title: str) -> None:
    """Which agent ran when, and the tier events (prefetch, promote on demand, demote,
    evict, cut to a head) as markers."""
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
    marks["trim"] = ("tab:purple", "|")
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
