"""Stage profile of a bench run (``kvshare bench --profile``): JSON, markdown, stacked bars."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from kvshare.bench.harness import BenchReport
from kvshare.engine.profile import BEFORE_FIRST_TOKEN

Profile = dict[str, list[dict[str, float]]]  # mode -> per agent position: stage -> ms


def stage_medians(report: BenchReport) -> Profile:
    """Median milliseconds per stage, per mode and agent position (stages before TTFT,
    then ``decode`` apart)."""
    stages = (*BEFORE_FIRST_TOKEN, "decode")
    out: Profile = {}
    for m in report.modes:
        per_pos = []
        for pos in range(len(report.agents)):
            calls = [c for c in report.calls if c["mode"] == m.mode and c["position"] == pos]
            timed = [t for c in calls if isinstance(t := c.get("stages"), dict)]
            per_pos.append(
                {s: 1e3 * statistics.median([float(t.get(s, 0.0)) for t in timed]) for s in stages}
                if timed
                else {}
            )
        out[m.mode] = per_pos
    return out


def markdown(report: BenchReport) -> str:
    """Per mode and agent position: TTFT stages (ms) and decode apart."""
    prof = stage_medians(report)
    stages = (*BEFORE_FIRST_TOKEN, "decode")
    lines = [
        "Stage profile (ms, median per agent position; device synchronised at stage edges):",
        "",
        "| mode | agent | " + " | ".join(stages) + " |",
        "|---|---|" + "---|" * len(stages),
    ]
    for mode, per_pos in prof.items():
        for pos, row in enumerate(per_pos):
            cells = " | ".join(f"{row.get(s, 0.0):.1f}" for s in stages)
            lines.append(f"| {mode} | {report.agents[pos]} | {cells} |")
    return "\n".join(lines) + "\n"


def plot(report: BenchReport, path: Path) -> None:
    """Stacked bars of the stages before the first token, per mode and agent position."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prof = stage_medians(report)
    labels = [f"{m}\n{report.agents[p]}" for m, rows in prof.items() for p in range(len(rows))]
    rows = [r for per_pos in prof.values() for r in per_pos]
    fig, ax = plt.subplots(figsize=(max(7, 0.45 * len(labels)), 4.5))
    bottom = [0.0] * len(rows)
    for stage in BEFORE_FIRST_TOKEN:
        vals = [r.get(stage, 0.0) for r in rows]
        ax.bar(range(len(rows)), vals, bottom=bottom, label=stage)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set_xticks(range(len(rows)), labels, fontsize=6, rotation=90)
    ax.set_ylabel("time to first token, ms (median)")
    ax.set_title(f"where TTFT goes: {report.workload['name']} — {report.machine}", fontsize=9)
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(report: BenchReport, out_dir: Path) -> dict[str, Path]:
    """``<workload>-profile.json`` and ``-profile.png`` in ``out_dir``; returns the paths."""
    stem = out_dir / f"{report.workload['name']}-profile"
    paths = {"profile_json": stem.with_suffix(".json"), "profile_png": stem.with_suffix(".png")}
    paths["profile_json"].write_text(json.dumps(stage_medians(report), indent=1))
    plot(report, paths["profile_png"])
    return paths
