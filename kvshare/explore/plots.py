"""Figures of the exploration notebooks and ``kvshare bench --plots``.

Every figure is one function ``plot_xxx(data, path=None) -> Figure``: a matplotlib
``Figure`` (no pyplot state; shown as a PNG when a notebook cell ends on it) with a title and
labelled axes with units; with ``path`` it is also written there as a PNG at :data:`DPI`.
The data come from ``kvshare.explore.reuse``, ``kvshare.explore.fidelity`` and
``kvshare.explore.time``.

The figures live by family in ``plots_reuse``, ``plots_fidelity`` and ``plots_time`` (shared
plumbing: ``plots_base``); this module re-exports them all, so ``plots.plot_xxx`` works.
"""

from __future__ import annotations

from kvshare.explore.plots_base import DPI, SHOWN_DPI, ShownFigure
from kvshare.explore.plots_fidelity import (
    PARETO_METRICS,
    plot_error_map,
    plot_layer_profile,
    plot_pareto,
    plot_run_starts,
    plot_sweeps,
    setting_value,
)
from kvshare.explore.plots_reuse import (
    PART_COLORS,
    PART_LABELS,
    PARTS,
    plot_kind_reuse,
    plot_learning,
    plot_reuse_bars,
)
from kvshare.explore.plots_time import (
    EVENT_STYLE,
    STAGE_NAMES,
    plot_stage_profile,
    plot_tier_timeline,
    plot_tier_ttft,
)

__all__ = [
    "DPI",
    "EVENT_STYLE",
    "PARETO_METRICS",
    "PARTS",
    "PART_COLORS",
    "PART_LABELS",
    "SHOWN_DPI",
    "STAGE_NAMES",
    "ShownFigure",
    "plot_error_map",
    "plot_kind_reuse",
    "plot_layer_profile",
    "plot_learning",
    "plot_pareto",
    "plot_reuse_bars",
    "plot_run_starts",
    "plot_stage_profile",
    "plot_sweeps",
    "plot_tier_timeline",
    "plot_tier_ttft",
    "setting_value",
]
