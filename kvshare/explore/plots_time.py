"""Time figures: per-stage time of a call, and one workflow under memory pressure (tier
timeline, TTFT per policy); data from ``kvshare.explore.time``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from kvshare.engine.profile import BEFORE_FIRST_TOKEN
from kvshare.explore.plots_base import SHOWN_DPI, ShownFigure, save_figure
from kvshare.explore.time import StageProfile, TierRun, TierRuns

EVENT_STYLE = {
    "put": ("tab:gray", "."),
    "hit": ("tab:green", "o"),
    "miss": ("tab:red", "x"),
    "prefetch": ("tab:cyan", "^"),
    "promote": ("tab:red", "v"),
    "demote": ("tab:orange", "<"),
    "evict": ("black", "X"),
}


def _stacked(ax: Any, rows: Sequence[Mapping[str, float]], stages: Sequence[str]) -> None:
    left = [0.0] * len(rows)
    for stage in stages:
        vals = [r.get(stage, 0.0) for r in rows]
        color = f"C{BEFORE_FIRST_TOKEN.index(stage)}"
        ax.barh(range(len(rows)), vals, left=left, color=color, label=STAGE_NAMES.get(stage, stage))
        left = [a + b for a, b in zip(left, vals, strict=True)]


STAGE_NAMES = {"plan": "plan (match)"}


def plot_stage_profile(prof: StageProfile, path: str | Path | None = None) -> Figure:
    """Per mode and agent: the median stage times before the first token (stacked), the same
    without the prefill (what reuse costs around it), and decode."""
    labels = [f"{m} · {prof.agents[p]}" for m, rows in prof.ms.items() for p in range(len(rows))]
    rows = [r for per_pos in prof.ms.values() for r in per_pos]
    fig = ShownFigure(figsize=(11, 0.3 * len(rows) + 1.9), dpi=SHOWN_DPI)
    ax1, ax2, ax3 = fig.subplots(1, 3, gridspec_kw={"width_ratios": [3, 2, 1]}, sharey=True)
    _stacked(ax1, rows, BEFORE_FIRST_TOKEN)
    _stacked(ax2, rows, [s for s in BEFORE_FIRST_TOKEN if s != "prefill"])
    ax1.set_yticks(range(len(rows)), labels, fontsize=7)
    ax1.invert_yaxis()
    ax1.set_xlabel("time to first token, ms (median per stage)")
    ax1.set_ylabel("mode · agent (in workflow order)")
    ax2.set_xlabel("the stages around the prefill, ms")
    ax3.barh(range(len(rows)), [r.get("decode", 0.0) for r in rows], color="tab:gray")
    ax3.set_xlabel("decode, ms (median)")
    fig.suptitle("Where a call's time goes, per stage", fontsize=10)
    return save_figure(fig, path, legend_from=ax1)


def plot_tier_timeline(run: TierRun, path: str | Path | None = None) -> Figure:
    """Which agent ran when (bars), and every tier event on the tier it touched (markers)."""
    tl = run.timeline
    agents = list(dict.fromkeys(a for a, _, _ in tl.calls))
    tiers = list(dict.fromkeys(t for e in tl.events for t in (e[3] or e[2],) if t))
    rows = agents + [f"tier: {t}" for t in tiers]
    fig = ShownFigure(figsize=(10, 0.4 * len(rows) + 1.8), dpi=SHOWN_DPI)
    ax = fig.subplots()
    for a, start, end in tl.calls:
        ax.barh(agents.index(a), end - start, left=start, height=0.6, color="tab:blue")
    for kind, (color, marker) in EVENT_STYLE.items():
        pts = [
            (at, len(agents) + tiers.index(dst or src))
            for k, at, src, dst in tl.events
            if k == kind and (dst or src)
        ]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.scatter(xs, ys, color=color, marker=marker, s=18, label=kind)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("time since the run began, s")
    ax.set_ylabel("agent calls / tier events")
    ax.set_title(
        f"One workflow run under memory pressure: {run.policy} policy "
        f"({run.demand_misses} demand misses)",
        fontsize=10,
    )
    return save_figure(fig, path, legend_from=ax)


def plot_tier_ttft(runs: TierRuns, path: str | Path | None = None) -> Figure:
    """TTFT of every call under each policy, in call order."""
    fig = ShownFigure(figsize=(8, 3.4), dpi=SHOWN_DPI)
    ax = fig.subplots()
    for policy, run in runs.runs.items():
        ms = [1e3 * t for t in run.ttft_s]
        mean = sum(ms) / len(ms) if ms else 0.0
        ax.plot(range(1, len(ms) + 1), ms, "o-", ms=3, label=f"{policy} (mean {mean:.0f} ms)")
    ax.set_xlabel("call (in workflow order)")
    ax.set_ylabel("time to first token, ms")
    share = runs.device_bytes / runs.working_set if runs.working_set else 0.0
    ax.set_title(
        f"TTFT with and without workflow-aware tiers (device tier {share:.0%} "
        "of the working set, disk below)",
        fontsize=10,
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)
