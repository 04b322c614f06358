"""Reuse figures: token reuse per group, where each segment kind's KV came from, and reuse
as the anchor pool learns (data from ``kvshare.explore.reuse`` and
``kvshare.explore.fidelity``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from kvshare.explore.fidelity import CurvePoint
from kvshare.explore.plots_base import SHOWN_DPI, ShownFigure, save_figure
from kvshare.explore.reuse import Reuse

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
    return save_figure(fig, path)


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
    return save_figure(fig, path, legend_from=axes[0])


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
    return save_figure(fig, path)
