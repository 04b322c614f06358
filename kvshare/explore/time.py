"""Where the time goes, for ``notebooks/03_where_time_goes``: :func:`stage_profile` (median
milliseconds per pipeline stage, per mode and agent position) and :func:`tier_runs` (one
workflow under memory pressure per tier policy: TTFT per call and the tier timeline).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from kvshare.bench.workloads import SyntheticWorkload, Workload
from kvshare.engine.engine import Engine


class StageProfile(NamedTuple):
    """Median milliseconds per stage (``kvshare.engine.profile.STAGES`` before the first token, then
    ``decode``), per mode and agent position (``agents``), from ``bench.profile_report``."""

    agents: list[str]
    ms: dict[str, list[dict[str, float]]]


def stage_profile(
    base: Engine, wl: Workload, modes: Sequence[str] = ("prefix", "kvshare"), repeats: int = 1
) -> StageProfile:
    """``bench.harness.run_bench`` with ``profile=True`` engines (``full`` first), no shadow."""
    from kvshare.bench.harness import run_bench
    from kvshare.bench.profile_report import stage_medians

    opts = {m: {"profile": True} for m in ("full", *modes)}
    report = run_bench(base, wl, modes, repeats, shadow=False, progress=False, options=opts)
    return StageProfile(report.agents, stage_medians(report))


class TierRun(NamedTuple):
    """One policy's run of ``bench.tiers.run_policy``: per call agent and TTFT (s), the tier
    timeline, demand misses and device-tier hits (tiered store counters), replies."""

    policy: str
    agents: list[str]
    ttft_s: list[float]
    timeline: Any
    demand_misses: int
    hits: int
    outputs: list[str]


class TierRuns(NamedTuple):
    """Working set (bytes, ``bench.tiers.working_set``), the device tier's budget, runs."""

    working_set: int
    device_bytes: int
    runs: dict[str, TierRun]


def tier_runs(
    base: Engine,
    wl: SyntheticWorkload,
    fraction: float = 0.25,
    gap_s: float = 0.05,
    policies: Sequence[str] = ("workflow", "lru", "none"),
) -> TierRuns:
    """``wl`` under each policy (``workflow``: hints, workflow eviction and prefetch; ``lru``;
    ``none``: ``full`` mode) with a device tier of ``fraction`` of the working set over a
    disk tier (``bench.tiers.run_policy``)."""
    from kvshare.bench.tiers import run_policy, working_set

    base.fork(mode="full").chat([{"role": "user", "content": "Hello"}], max_new_tokens=2)
    total = working_set(base, wl)
    device = max(1, int(fraction * total))
    runs = {}
    for policy in policies:
        engine, calls, texts, timeline = run_policy(base, wl, policy, device, gap_s)
        store = engine.segments
        runs[policy] = TierRun(
            policy,
            [c.agent or "" for c in calls],
            [c.ttft_s for c in calls],
            timeline,
            sum(getattr(store, "demand_misses", {}).values()),
            sum(getattr(store, "hits", {}).values()),
            texts,
        )
        if engine.prefetcher is not None:
            engine.prefetcher.close()
    return TierRuns(total, device, runs)


def fmt_stages(prof: StageProfile) -> str:
    """A text table: median ms per stage before the first token, then decode, per mode and
    agent position."""
    from kvshare.engine.profile import BEFORE_FIRST_TOKEN

    stages = (*BEFORE_FIRST_TOKEN, "decode")
    rows = [f"{'mode · agent':28}" + "".join(f"{s:>9}" for s in stages)]
    for mode, per_pos in prof.ms.items():
        for pos, row in enumerate(per_pos):
            cells = "".join(f"{row.get(s, 0.0):9.1f}" for s in stages)
            rows.append(f"{mode + ' · ' + prof.agents[pos]:28}{cells}")
    return "\n".join(rows)


def fmt_tiers(runs: TierRuns) -> str:
    """Per policy: mean and worst TTFT (ms), demand misses, device-tier hits, and whether
    its replies equal the first policy's."""
    first = next(iter(runs.runs.values()))
    rows = [f"{'policy':10} {'mean TTFT':>10} {'max TTFT':>9} {'misses':>7} {'hits':>5}  same"]
    for policy, r in runs.runs.items():
        ms = [1e3 * t for t in r.ttft_s]
        same = "yes" if r.outputs == first.outputs else "no"
        rows.append(
            f"{policy:10} {sum(ms) / len(ms):8.0f}ms {max(ms):7.0f}ms {r.demand_misses:7} "
            f"{r.hits:5}  {same}"
        )
    return "\n".join(rows)
