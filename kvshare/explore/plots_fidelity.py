"""Fidelity figures: option sweeps, the reuse/fidelity Pareto panels and where the KV
error sits (per token, per layer, at relocated run starts); data from
``kvshare.explore.fidelity``."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from kvshare.explore.fidelity import KVError, Point
from kvshare.explore.plots_base import DPI, SHOWN_DPI, ShownFigure, save_figure


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
    return save_figure(fig, path)


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
    return save_figure(fig, path)


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
    return save_figure(fig, path)


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
    return save_figure(fig, path)


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
