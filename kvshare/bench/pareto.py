"""Reuse vs fidelity across recompute budgets (blend, kvshare) and entropy gates (anchor)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel

from kvshare.bench.harness import run_bench
from kvshare.bench.workloads import Workload
from kvshare.engine import Engine

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


def sweep(base: Engine, workload: Workload, progress: bool = True) -> list[ParetoPoint]:
    """One cold pass per (mode, setting); ``kvshare`` runs with a fixed ratio here."""
    grid: list[tuple[str, str, float, dict[str, Any]]] = []
    for r in RATIOS:
        grid.append(("blend", f"ratio={r}", r, {"recompute_ratio": r}))
        grid.append(("kvshare", f"ratio={r}", r, {"recompute_ratio": r, "adaptive": False}))
    grid += [("anchor", f"gamma={g}", 0.0, {"anchor_gamma": g}) for g in GAMMAS]
    points = []
    for mode, setting, ratio, opts in grid:
        rep = run_bench(base, workload, [mode], repeats=1, progress=progress, options={mode: opts})
        m = rep.modes[-1]
        points.append(
            ParetoPoint(
                mode=mode,
                setting=setting,
                recompute_ratio=ratio,
                token_reuse=m.token_reuse,
                mean_kl=m.mean_kl,
                top1_agree=m.top1_agree,
                task_score=m.task_score,
            )
        )
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
