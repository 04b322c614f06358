"""Figures of the exploration notebooks and ``kvshare bench --plots``.

Every figure is one function ``plot_xxx(data, path=None) -> Figure``: a matplotlib
``Figure`` (no pyplot state; shown as a PNG when a notebook cell ends on it) with a title and
labelled axes with units; with ``path`` it is also written there as a PNG at :data:`DPI`.
The data come from ``kvshare.explore``, ``kvshare.explore_fidelity`` and
``kvshare.explore_time``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from kvshare.explore import Reuse
from kvshare.explore_fidelity import CurvePoint, KVError, Point
from kvshare.explore_time import StageProfile, TierRun, TierRuns
from kvshare.profile import BEFORE_FIRST_TOKEN

DPI = 110  # PNG files (docs/)
SHOWN_DPI = 72  # PNGs a notebook keeps: small enough for a code host to render
PARTS = ("prefix_hit", "relocated", "recomputed", "fresh")
PART_COLORS = {
    "prefix_hit": "tab:green",
    "relocated": "tab:blue",
    "recomputed": "tab:orange",
    "fresh": "tab:gray",
}
PART_LABELS = {
    "prefix_hit": "exact-prefix hit",
    "relocated": "relocated, kept",
    "recomputed": "relocated, recomputed",
    "fresh": "computed (no KV to reuse)",
}
EVENT_STYLE = {
    "put": ("tab:gray", "."),
    "hit": ("tab:green", "o"),
    "miss": ("tab:red", "x"),
    "prefetch": ("tab:cyan", "^"),
    "promote": ("tab:red", "v"),
    "demote": ("tab:orange", "<"),
    "evict": ("black", "X"),
}


class ShownFigure(Figure):
    """A matplotlib ``Figure`` that notebooks display as a PNG (at :data:`SHOWN_DPI`) without
    pyplot or a backend: ``_repr_png_``, IPython's rich display hook."""

    def _repr_png_(self) -> bytes:
        buf = io.BytesIO()
        self.savefig(buf, format="png", dpi=SHOWN_DPI)
        return buf.getvalue()


def _save(fig: Figure, path: str | Path | None, legend_from: Any = None) -> Figure:
    """Lay out (with ``legend_from``'s legend in one row below the axes), write ``path``."""
    if legend_from is None:
        fig.tight_layout()
    else:
        handles, names = legend_from.get_legend_handles_labels()
        fig.legend(handles, names, fontsize=7, ncol=len(names), loc="lower center")
        fig.tight_layout(rect=(0, 0.5 / fig.get_figheight(), 1, 1))
    if path is not None:
        fig.savefig(path, dpi=DPI)
    return fig


def _parts(r: Reuse) -> dict[str, int]:
    """Token counts of ``r`` split four ways (fresh: computed and never reused)."""
    fresh = r.computed - r.recomputed
    return {
        "prefix_hit": r.prefix_hit,
        "relocated": r.relocated,
        "recomputed": r.recomputed,
        "fresh": fresh,
    }


def plot_reuse_bars(
    tables: Mapping[str, Mapping[str, Reuse]], title: str, path: str | Path | None = None
) -> Figure:
    """Token reuse (%) per group (agent, topology, ...), one bar per series (mode, run)."""
    groups = list(dict.fromkeys(g for t in tables.values() for g in t))
    fig = ShownFigure(figsize=(7, 0.35 * len(groups) * max(1, len(tables)) + 1.4), dpi=SHOWN_DPI)
    ax = fig.subplots()
    h = 0.8 / max(1, len(tables))
    for k, (series, table) in enumerate(tables.items()):
        ys = [i + k * h for i, g in enumerate(groups) if g in table]
        xs = [100 * table[g].rate for g in groups if g in table]
        ax.barh(ys, xs, height=h, label=series)
        for y, x in zip(ys, xs, strict=True):
            ax.text(x + 0.5, y, f"{x:.0f}%", va="center", fontsize=7)
    ax.set_yticks([i + h * (len(tables) - 1) / 2 for i in range(len(groups))], groups)
    ax.invert_yaxis()
    ax.set_xlim(0, 105)
    ax.set_xlabel("token reuse, % of prompt tokens")
    ax.set_ylabel("group")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def plot_kind_reuse(
    tables: Mapping[str, Mapping[str, Reuse]], title: str, path: str | Path | None = None
) -> Figure:
    """Per series (mode) and segment kind: where its prompt tokens' KV came from (shares)."""
    fig = ShownFigure(figsize=(4.2 * len(tables), 3.2), dpi=SHOWN_DPI)
    axes = fig.subplots(1, len(tables), squeeze=False)[0]
    for ax, (series, table) in zip(axes, tables.items(), strict=True):
        kinds = list(table)
        left = [0.0] * len(kinds)
        for part in PARTS:
            vals = [100 * _parts(table[k])[part] / table[k].prompt for k in kinds]
            ax.barh(kinds, vals, left=left, color=PART_COLORS[part], label=PART_LABELS[part])
            left = [a + b for a, b in zip(left, vals, strict=True)]
        for i, k in enumerate(kinds):
            ax.text(101, i, f"{table[k].prompt} tok", va="center", fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 125)
        ax.set_xlabel("share of the kind's prompt tokens, %")
        ax.set_ylabel("segment kind")
        ax.set_title(series, fontsize=9)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path, legend_from=axes[0])


def plot_learning(points: Sequence[CurvePoint], path: str | Path | None = None) -> Figure:
    """Per mode, question by question on one engine: token reuse, the share of relocated
    tokens recomputed after all, and the anchor pool's size."""
    fig = ShownFigure(figsize=(11, 3.2), dpi=SHOWN_DPI)
    axes = fig.subplots(1, 3)
    panels = (
        ("token reuse of its calls, %", lambda p: 100 * p.reuse),
        ("relocated tokens recomputed, %", lambda p: 100 * p.realized),
        ("anchor pool after it, MiB", lambda p: p.anchors_bytes / 2**20),
    )
    for ax, (label, value) in zip(axes, panels, strict=True):
        for mode in dict.fromkeys(p.mode for p in points):
            mine = [p for p in points if p.mode == mode]
            ax.plot([p.item + 1 for p in mine], [value(p) for p in mine], "o-", label=mode)
        ax.set_xlabel("question (in the order asked)")
        ax.set_ylabel(label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Reuse as the anchor pool learns over a run of questions", fontsize=10)
    return _save(fig, path)


def setting_value(p: Point) -> float:
    """The number after ``=`` in a point's setting (``ratio=0.15`` -> 0.15)."""
    return float(p.setting.split("=", 1)[1])


def plot_sweeps(
    sweeps: Mapping[str, Sequence[Point]], title: str, path: str | Path | None = None
) -> Figure:
    """One panel per swept option (the key names it): token reuse (%) and, where measured,
    mean first-token KL against the option's value."""
    fig = ShownFigure(figsize=(3.6 * len(sweeps) + 0.5, 3.3), dpi=SHOWN_DPI)
    axes = fig.subplots(1, len(sweeps), squeeze=False)[0]
    for ax, (name, points) in zip(axes, sweeps.items(), strict=True):
        xs = [setting_value(p) for p in points]
        ax.plot(xs, [100 * p.reuse for p in points], "o-", color="tab:blue")
        if min(xs, default=0) > 0 and max(xs) >= 10 * min(xs):
            ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel("token reuse, %", color="tab:blue")
        ax.set_title(f"{points[0].mode}: {name}" if points else name, fontsize=9)
        ax.grid(alpha=0.3)
        if any(p.kl is not None for p in points):
            kl = ax.twinx()
            kls = [p.kl if p.kl is not None else math.nan for p in points]
            kl.plot(xs, kls, "s--", color="tab:red")
            kl.set_ylabel("mean first-token KL, nats", color="tab:red")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


PARETO_METRICS = (
    ("kl", "mean first-token KL vs full (nats)"),
    ("top1", "top-1 agreement, %"),
    ("greedy", "median greedy match, tokens of 32"),
    ("score", "task score, points (0-100)"),
)


def plot_pareto(points: Sequence[Point], title: str, path: str | Path | None = None) -> Figure:
    """Fidelity against token reuse for every setting, one panel per fidelity measure."""
    fig = ShownFigure(figsize=(9, 6.5), dpi=SHOWN_DPI)
    axes = fig.subplots(2, 2).ravel()
    series = {"prefix": ("prefix", "D"), "blend": ("blend", "s"), "anchor": ("anchor", "^")}
    for ax, (field, label) in zip(axes, PARETO_METRICS, strict=True):
        for name in ("prefix", "blend", "anchor", "kvshare", "kvshare (matched)"):
            mode, marker = series.get(name, ("kvshare", "o"))
            matched = name.endswith("(matched)")
            pts = sorted(
                (p for p in points if p.mode == mode and ("match" in p.setting) == matched),
                key=lambda p: p.reuse,
            )
            ys = [_metric(p, field) for p in pts]
            if not pts or all(math.isnan(y) for y in ys):
                continue
            fill = "none" if matched else "full"
            ax.plot(
                [100 * p.reuse for p in pts],
                ys,
                marker=marker,
                fillstyle=fill,
                linestyle=":" if matched else "-",
                label=name,
            )
        ax.set_xlabel("token reuse, %")
        ax.set_ylabel(label, fontsize=8)
        if field == "kl":
            ax.set_yscale("symlog", linthresh=1e-3)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def _metric(p: Point, field: str) -> float:
    value = getattr(p, field)
    if value is None:
        return math.nan
    return 100 * float(value) if field == "top1" else float(value)


def _log_norm(*maps: torch.Tensor) -> LogNorm:
    vals = torch.cat([m[torch.isfinite(m) & (m > 0)].flatten() for m in maps])
    hi = float(vals.max()) if vals.numel() else 1.0
    return LogNorm(vmin=max(hi * 1e-4, 1e-6), vmax=max(hi, 1e-5))


def plot_error_map(err: KVError, path: str | Path | None = None) -> Figure:
    """One call's relative KV error per layer and prompt token, message bounds marked."""
    fig = ShownFigure(figsize=(10, 3.6), dpi=SHOWN_DPI)
    ax = fig.subplots()
    e = err.error.clamp_min(1e-6)
    im = ax.imshow(
        e.numpy(),
        aspect="auto",
        origin="lower",
        norm=_log_norm(e),
        cmap="magma",
        interpolation="nearest",
    )
    for m, kind in zip(err.record.stats.message_reuse, err.record.kinds, strict=True):
        ax.axvline(m.start - 0.5, color="white", lw=0.6)
        tag = f"{kind}\n{m.reuse_rate:.0%} reused" if m.tokens > 40 else ""
        ax.text(m.start + 2, e.shape[0] - 1.5, tag, color="white", fontsize=6, va="top")
    for start, _ in err.record.stats.relocated_runs:
        ax.axvline(start - 0.5, color="cyan", lw=0.8, ls="--")
    fig.colorbar(im, ax=ax, label="relative KV error vs full (K+V), log")
    ax.set_xlabel("prompt token position")
    ax.set_ylabel("layer")
    s = err.record.stats
    ax.set_title(
        f"Where one call's KV deviates from a full prefill: {err.mode}, {s.agent} "
        f"(call {err.record.position + 1} of its run, {s.reuse_rate:.0%} reused)",
        fontsize=9,
    )
    return _save(fig, path)


def plot_layer_profile(
    profile: Mapping[str, torch.Tensor], path: str | Path | None = None
) -> Figure:
    """Mean relative KV error per mode and layer (a heatmap)."""
    modes = list(profile)
    grid = torch.stack([profile[m] for m in modes]).clamp_min(1e-6)
    fig = ShownFigure(figsize=(9, 0.45 * len(modes) + 1.6), dpi=SHOWN_DPI)
    ax = fig.subplots()
    im = ax.imshow(
        grid.numpy(), aspect="auto", norm=_log_norm(grid), cmap="magma", interpolation="nearest"
    )
    ax.set_yticks(range(len(modes)), modes)
    ax.set_xlabel("layer")
    ax.set_ylabel("mode")
    fig.colorbar(im, ax=ax, label="mean relative KV error, log")
    ax.set_title("Where the error sits by layer (mean over every prompt token)", fontsize=10)
    return _save(fig, path)


def plot_run_starts(profile: Mapping[str, torch.Tensor], path: str | Path | None = None) -> Figure:
    """Per mode: mean relative KV error per layer at token offsets from relocated run starts."""
    modes = list(profile)
    fig = ShownFigure(figsize=(3.6 * len(modes) + 1, 3.4), dpi=SHOWN_DPI, layout="constrained")
    axes = fig.subplots(1, len(modes), squeeze=False)[0]
    norm = _log_norm(*profile.values())
    im = None
    for ax, mode in zip(axes, modes, strict=True):
        im = ax.imshow(
            profile[mode].clamp_min(1e-6).numpy(),
            aspect="auto",
            origin="lower",
            norm=norm,
            cmap="magma",
            interpolation="nearest",
        )
        ax.set_xlabel("tokens after a relocated run's start")
        ax.set_ylabel("layer")
        ax.set_title(mode, fontsize=9)
    if im is not None:
        fig.colorbar(im, ax=list(axes), label="mean relative KV error, log")
    fig.suptitle("Error at run starts (first tokens of every relocated run)", fontsize=10)
    if path is not None:
        fig.savefig(path, dpi=DPI)
    return fig


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
    return _save(fig, path, legend_from=ax1)


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
    return _save(fig, path, legend_from=ax)


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
    return _save(fig, path)
