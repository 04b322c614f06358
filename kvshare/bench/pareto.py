"""Reuse vs fidelity across recompute budgets (blend, kvshare) and entropy gates (anchor)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from tqdm.auto import tqdm

from kvshare.bench.harness import run_workflow
from kvshare.bench.workloads import Workload
from kvshare.engine import Engine
from kvshare.stats import CallStats, aggregate

RATIOS = (0.0, 0.05, 0.15, 0.3, 0.5)
GAMMAS = (0.3, 0.6, 0.9, 1.2)


class ParetoPoint(BaseModel):
    mode: str
    setting: str
    recompute_ratio: float
    token_reuse: float
    mean_kl: float | None
    top1_agree: float | None
    task_score: float | None


def _point(
    base: Engine, workload: Workload, mode: str, setting: str, ratio: float, opts: dict[str, Any]
) -> ParetoPoint:
    """One cold pass of every item under one setting, with shadow fidelity."""
    eng = base.fork(mode=mode, **opts)
    calls: list[CallStats] = []
    scores: list[float] = []
    for item in range(workload.n_items):
        stats, outs, _ = run_workflow(eng, workload, True, "pareto", item)
        calls += stats
        score = workload.score(item, outs)
        if score is not None:
            scores.append(score)
    agg = aggregate(calls)
    return ParetoPoint(
        mode=mode,
        setting=setting,
        recompute_ratio=ratio,
        token_reuse=agg.reuse_rate,
        mean_kl=agg.mean_kl,
        top1_agree=agg.top1_agree_rate,
        task_score=100 * statistics.fmean(scores) if scores else None,
    )


def sweep(base: Engine, workload: Workload, progress: bool = True) -> list[ParetoPoint]:
    """One cold pass per (mode, setting); ``kvshare`` runs with a fixed ratio here.

    No ``full`` pass is needed: every call's fidelity comes from its own shadow prefill.
    """
    grid: list[tuple[str, str, float, dict[str, Any]]] = []
    for r in RATIOS:
        grid.append(("blend", f"ratio={r}", r, {"recompute_ratio": r}))
        grid.append(("kvshare", f"ratio={r}", r, {"recompute_ratio": r, "adaptive": False}))
    grid += [("anchor", f"gamma={g}", 0.0, {"anchor_gamma": g}) for g in GAMMAS]
    points = []
    for mode, setting, ratio, opts in tqdm(grid, desc="pareto", disable=not progress):
        points.append(_point(base, workload, mode, setting, ratio, opts))
    return points


def plot(points: list[ParetoPoint], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for mode, marker in (("blend", "s"), ("anchor", "^"), ("kvshare", "o")):
        pts = sorted(
            (p for p in points if p.mode == mode and p.mean_kl is not None),
            key=lambda p: p.token_reuse,
        )
        kls: list[float] = [p.mean_kl or 0.0 for p in pts]
        ax.plot([p.token_reuse * 100 for p in pts], kls, marker=marker, label=mode)
        for p in pts:
            ax.annotate(
                p.setting.split("=")[1],
                (p.token_reuse * 100, p.mean_kl or 0),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.set_xlabel("token reuse, %")
    ax.set_ylabel("mean first-token KL vs full prefill")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
