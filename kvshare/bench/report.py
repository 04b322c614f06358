"""Writing a BenchReport as JSON, a markdown table and a PNG plot."""

from __future__ import annotations

from pathlib import Path

from kvshare.bench.harness import BenchReport


def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def markdown(report: BenchReport) -> str:
    """A per-mode summary table plus per-agent TTFT and speedup."""
    w = report.workload
    lines = [
        f"Workload `{w['name']}`: {w}. Machine: {report.machine}, torch {report.torch}; "
        f"median of {report.repeats} repeats, modes interleaved; "
        + (
            "every reused call also taught by a full prefill (`--teach`: not what production "
            "calls get)."
            if report.teach
            else "production learning (shadow prefills observe only)."
        ),
        "",
        "| mode | token reuse | call reuse | last-agent TTFT (s) | last-agent speedup | "
        "mean KL | top-1 | greedy match | task score | peak stored KV (MiB) | anchor pool (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    na = "n/a (random weights)"
    for m in report.modes:
        fidelity = (
            f"{na} | {na} | {na} | {na}"
            if report.random_weights
            else f"{_fmt(m.mean_kl, '.4f')} | {_fmt(m.top1_agree, '.1%')} | "
            f"{_fmt(m.median_greedy_match, '.0f')} | {_fmt(m.task_score, '.1f')}"
        )
        lines.append(
            f"| {m.mode} | {m.token_reuse:.1%} | {m.call_reuse:.0%} | {m.ttft_s[-1]:.3f} | "
            f"{m.speedup[-1]:.2f}× | {fidelity} | "
            f"{m.peak_kv_bytes / 2**20:.1f} | {m.anchor_pool_bytes / 2**20:.1f} |"
        )
    lines += idle_lines(report.idle, report.gap_s)
    lines += ["", "TTFT per agent position (s), speedup vs full in brackets:", ""]
    rows = {
        name: [f"{m.ttft_s[i]:.3f} ({m.speedup[i]:.2f}×)" for m in report.modes]
        for i, name in enumerate(report.agents)
    }
    lines += agent_grid([m.mode for m in report.modes], rows)
    return "\n".join(lines) + "\n"


def idle_lines(idle: dict[str, dict[str, float]], gap_s: float, where: str = "call") -> list[str]:
    """Idle-time teaching per mode that had it (``--idle-teach``), with the gap used."""
    lines = []
    for mode, f in idle.items():
        lines.append(
            f"Idle-time teaching, `{mode}` ({gap_s:g} s idle after each {where}): "
            f"{f['taught']:.0f} of {f['offered']:.0f} jobs taught ({f['preempted']:.0f} "
            f"preempted, {f['dropped']:.0f} dropped), {f['busy_s']:.1f} s on the model, "
            f"longest step {1000 * f['step_s']:.0f} ms; {f['waited_calls']:.0f} calls waited "
            f"on it (longest {1000 * f['max_wait_s']:.0f} ms, {f['waits_over_a_step']:.0f} "
            "longer than one step)."
        )
    return [""] + lines if lines else []


def agent_grid(modes: list[str], rows: dict[str, list[str]]) -> list[str]:
    """A markdown table: one row per agent, one column per mode."""
    lines = ["| agent | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
    return lines + [f"| {agent} | " + " | ".join(cells) + " |" for agent, cells in rows.items()]


def plot(report: BenchReport, path: Path) -> None:
    """TTFT per agent position, one line per mode, with token reuse in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    xs = list(range(1, len(report.agents) + 1))
    for m in report.modes:
        ax.plot(
            xs,
            [t * 1000 for t in m.ttft_s],
            marker="o",
            label=f"{m.mode} (reuse {m.token_reuse:.0%})",
        )
    ax.set_xlabel("agent position")
    ax.set_ylabel("TTFT, ms (median)")
    ax.set_title(f"kvshare bench: {report.workload['name']} — {report.machine}", fontsize=9)
    ax.set_xticks(xs)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(report: BenchReport, out_dir: Path) -> dict[str, Path]:
    """Write ``<workload>.json``, ``.md`` and ``.png`` into ``out_dir``; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / str(report.workload["name"])
    paths = {
        "json": stem.with_suffix(".json"),
        "md": stem.with_suffix(".md"),
        "png": stem.with_suffix(".png"),
    }
    paths["json"].write_text(report.model_dump_json(indent=1))
    paths["md"].write_text(markdown(report))
    plot(report, paths["png"])
    return paths
