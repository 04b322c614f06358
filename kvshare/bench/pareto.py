"""Reuse vs fidelity across recompute budgets (blend, kvshare) and entropy gates (anchor)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from tqdm.auto import tqdm

from kvshare.bench.harness import run_workflow
from kvshare.bench.workloads import Workload
from kvshare.engine.engine import Engine
from kvshare.engine.stats import CallStats, aggregate

RATIOS = (0.0, 0.05, 0.15, 0.3, 0.5)
GAMMAS = (0.3, 0.6, 0.9, 1.2)


class ParetoPoint(BaseModel):
    """One cold pass under one setting.

    recompute_ratio: the nominal setting (``blend``/``kvshare`` budget; 0 for ``anchor``).
    realized_ratio: recomputed / (relocated + recomputed) tokens over the pass: the share of
        the reusable tokens that were computed after all (sinks, recent tokens, threshold
        extras and ``anchor``'s dense fallbacks included), comparable across modes.
    """

    mode: str
    setting: str
    recompute_ratio: float
    realized_ratio: float
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
    reusable = sum(c.relocated_tokens + c.recomputed_tokens for c in calls)
    return ParetoPoint(
        mode=mode,
        setting=setting,
        recompute_ratio=ratio,
        realized_ratio=sum(c.recomputed_tokens for c in calls) / reusable if reusable else 0.0,
        token_reuse=agg.reuse_rate,
        mean_kl=agg.mean_kl,
        top1_agree=agg.top1_agree_rate,
        task_score=100 * statistics.fmean(scores) if scores else None,
    )


def matched_ratio(target: float, floor: float) -> float:
    """The nominal ``kvshare`` ratio whose realized ratio is about ``target``, given the
    realized ratio ``floor`` of its forced tokens alone (nominal ratio 0): the budget is a
    share of the relocated tokens that are not forced."""
    return 0.0 if target <= floor else min(1.0, (target - floor) / (1.0 - floor))


def sweep(base: Engine, workload: Workload, progress: bool = True) -> list[ParetoPoint]:
    """One cold pass per (mode, setting); ``kvshare`` runs with a fixed ratio here.

    ``anchor`` has no ratio: for every entropy gate, ``kvshare`` also runs at the nominal
    ratio that matches that pass's realized ratio (setting ``match=gamma``), so that the two
    are compared at equal recompute. No ``full`` pass is needed: every call's fidelity comes
    from its own shadow prefill.
    """
    grid: list[tuple[str, str, float, dict[str, Any]]] = []
    for r in RATIOS:
        grid.append(("blend", f"ratio={r}", r, {"recompute_ratio": r}))
        grid.append(("kvshare", f"ratio={r}", r, {"recompute_ratio": r, "adaptive": False}))
    grid += [("anchor", f"gamma={g}", 0.0, {"anchor_gamma": g}) for g in GAMMAS]
    points = []
    bar = tqdm(total=len(grid) + len(GAMMAS), desc="pareto", disable=not progress)
    for mode, setting, ratio, opts in grid:
        points.append(_point(base, workload, mode, setting, ratio, opts))
        bar.update()
    floor = next(p.realized_ratio for p in points if p.mode == "kvshare")  # nominal ratio 0
    for p in [p for p in points if p.mode == "anchor"]:
        r = matched_ratio(p.realized_ratio, floor)
        opts = {"recompute_ratio": r, "adaptive": False}
        gamma = p.setting.split("=")[1]
        points.append(_point(base, workload, "kvshare", f"match={gamma}", r, opts))
        bar.update()
    bar.close()
    return points


def plot(points: list[ParetoPoint], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for mode, marker in (("blend", "s"), ("anchor", "^"), ("kvshare", "o")):
        pts = sorted(
            (
                p
                for p in points
                if p.mode == mode and p.mean_kl is not None and "match" not in p.setting
            ),
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
