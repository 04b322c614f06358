"""``kvshare bench --plots``: the notebooks' key figures, written as PNGs (default ``docs/``).

The same functions as the notebooks (``kvshare.explore.reuse*``), on small default runs of the
embedded model: reuse per agent and per segment kind on the reference teams, reuse per
topology, the reuse-vs-fidelity Pareto curves, the per-stage profile, and TTFT and the
tier timeline with and without workflow-aware scheduling. Each figure's caption (the numbers
it was drawn from) goes into ``figures.md`` next to it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from kvshare.engine.engine import Engine
from kvshare.errors import ConfigError

TEAMS = ("rag", "debate", "code")


@dataclass(frozen=True)
class PlotSizes:
    """How much each figure runs (items per team, synthetic shape, tier share)."""

    team_items: int = 1
    agents: int = 4
    prefix: int = 96
    input: int = 192
    output: int = 16
    items: int = 2
    tier_fraction: float = 0.5
    ratios: tuple[float, ...] = (0.0, 0.15, 0.5)  # Pareto grid (the notebook's is finer)
    gammas: tuple[float, ...] = (0.6, 1.2)


def _synthetic(engine: Engine, s: PlotSizes, items: int) -> Any:
    from kvshare.bench.corpus import long_text
    from kvshare.bench.workloads import SyntheticWorkload

    return SyntheticWorkload(
        engine.tokenizer, long_text(), s.agents, s.prefix, s.input, s.output, n_items=items
    )


def _teams(engine: Engine, s: PlotSizes, out: Path) -> str:
    from kvshare.explore import plots as pl
    from kvshare.explore import reuse as ex

    records = [r for t in TEAMS for r in ex.team_records(engine, t, s.team_items)]
    per_agent = {"kvshare": ex.reuse_by(records, lambda r: f"{r.run}: {r.stats.agent}")}
    title = "Token reuse per agent, reference teams (kvshare mode)"
    pl.plot_reuse_bars(per_agent, title, out / "reuse-per-agent.png")
    kinds = {"kvshare": ex.reuse_by_kind(records)}
    pl.plot_kind_reuse(kinds, "Where each kind of segment's KV came from", out / "reuse-kinds.png")
    return (
        "Per agent:\n"
        + ex.fmt_reuse(per_agent["kvshare"])
        + "\nPer kind:\n"
        + ex.fmt_reuse(kinds["kvshare"])
    )


def _topologies(engine: Engine, s: PlotSizes, out: Path) -> str:
    from kvshare.explore import plots as pl
    from kvshare.explore import reuse as ex

    wl = _synthetic(engine, s, s.items)
    table = {
        name: ex.reuse_by(ex.run_topology(engine, steps, wl, name), lambda r: "all calls")
        for name, steps in ex.TOPOLOGIES.items()
    }
    flat = {"kvshare": {name: t["all calls"] for name, t in table.items()}}
    pl.plot_reuse_bars(flat, "Token reuse per topology (kvshare mode)", out / "reuse-topology.png")
    return ex.fmt_reuse(flat["kvshare"])


def _pareto(engine: Engine, s: PlotSizes, out: Path) -> str:
    from kvshare.explore import fidelity as fi
    from kvshare.explore import plots as pl

    points = fi.pareto_points(engine, _synthetic(engine, s, 1), s.ratios, s.gammas)
    pl.plot_pareto(points, "Reuse vs fidelity, synthetic team", out / "pareto-synthetic.png")
    return fi.fmt_points(points)


def _stages(engine: Engine, s: PlotSizes, out: Path) -> str:
    from kvshare.explore import plots as pl
    from kvshare.explore import time as tm

    prof = tm.stage_profile(engine, _synthetic(engine, s, 1))
    pl.plot_stage_profile(prof, out / "stage-profile.png")
    return tm.fmt_stages(prof)


def _tiers(engine: Engine, s: PlotSizes, out: Path) -> str:
    from kvshare.explore import plots as pl
    from kvshare.explore import time as tm

    runs = tm.tier_runs(engine, _synthetic(engine, s, s.items + 1), s.tier_fraction)
    pl.plot_tier_ttft(runs, out / "tiers-ttft.png")
    pl.plot_tier_timeline(runs.runs["workflow"], out / "tiers-timeline.png")
    return tm.fmt_tiers(runs)


FIGURES: dict[str, Callable[[Engine, PlotSizes, Path], str]] = {
    "teams": _teams,
    "topologies": _topologies,
    "pareto": _pareto,
    "stages": _stages,
    "tiers": _tiers,
}


def write_plots(
    engine: Engine,
    out: Path,
    sizes: PlotSizes | None = None,
    progress: bool = True,
    names: tuple[str, ...] = tuple(FIGURES),
) -> Path:
    """The figures ``names`` of :data:`FIGURES` into ``out``, each one's numbers into
    ``out/figures-<name>.md``, and every such file found there into ``out/figures.md``;
    returns that file."""
    unknown = sorted(set(names) - set(FIGURES))
    if unknown:
        raise ConfigError(f"unknown figures {unknown}; known: {', '.join(FIGURES)}")
    sizes = sizes or PlotSizes()
    out.mkdir(parents=True, exist_ok=True)
    for name in tqdm(names, desc="plots", disable=not progress):
        numbers = FIGURES[name](engine, sizes, out).rstrip()
        (out / f"figures-{name}.md").write_text(f"## {name}\n\n```\n{numbers}\n```\n")
    head = f"Figures of `kvshare bench --plots` ({engine.loaded.source}, {engine.device}).\n"
    parts = [(out / f"figures-{n}.md") for n in FIGURES]
    path = out / "figures.md"
    path.write_text("\n".join([head, *(p.read_text() for p in parts if p.exists())]))
    return path
