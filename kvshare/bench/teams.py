"""``kvshare bench --workload rag|debate|code``: a reference team under several modes.

Every mode runs on its own fork of one engine (same weights, empty stores), items
interleaved (item k under every mode before item k+1), so each mode sees the same inputs in
the same order on the same machine. Per mode: task score, token reuse, fidelity of every
reused call against a full prefill of the same prompt (``shadow``), and per agent: calls,
token reuse and median TTFT. The wrapper's own cost per call (``ChatKVShare.invoke`` vs
``Engine.chat``, ``kvshare.bench.wrapper``) is measured on the same engine.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from tqdm.auto import tqdm

from kvshare.agents.teams.base import Team, TeamRun, run_team, team_graph
from kvshare.bench.harness import idle_summary, machine_description, pause_teaching
from kvshare.bench.report import agent_grid, idle_lines
from kvshare.engine.engine import Engine
from kvshare.engine.idle import IdleStats
from kvshare.engine.stats import CallStats, aggregate


class AgentRow(BaseModel):
    """One agent's calls under one mode."""

    agent: str
    calls: int
    prompt_tokens: int
    token_reuse: float
    median_ttft_s: float


class TeamModeResult(BaseModel):
    """One mode over every item."""

    mode: str
    score: float
    token_reuse: float
    calls: int
    mean_kl: float | None
    top1_agree: float | None
    median_greedy_match: float | None
    wall_s: float
    agents: list[AgentRow]
    answers: list[str]


class TeamReport(BaseModel):
    """Everything one team benchmark measured (written as JSON)."""

    team: str
    title: str
    score_name: str
    items: int
    machine: str
    torch: str
    created: str
    modes: list[TeamModeResult]
    wrapper: dict[str, float]
    gap_s: float = 0.0  # idle seconds after every workflow run (idle-time teaching's room)
    max_concurrency: int = 1  # parallel branches of a superstep run at once
    idle: dict[str, dict[str, float]] = {}  # mode -> idle-time teaching figures


def _agent_rows(team: Team, calls: Sequence[CallStats]) -> list[AgentRow]:
    rows = []
    for agent in team.agents:
        mine = [c for c in calls if c.agent == agent]
        if not mine:
            continue
        prompt = sum(c.prompt_tokens for c in mine)
        computed = sum(c.computed_tokens for c in mine)
        rows.append(
            AgentRow(
                agent=agent,
                calls=len(mine),
                prompt_tokens=prompt,
                token_reuse=1 - computed / prompt if prompt else 0.0,
                median_ttft_s=statistics.median(c.ttft_s for c in mine),
            )
        )
    return rows


def _merge(runs: Sequence[TeamRun]) -> TeamRun:
    first = runs[0]
    return TeamRun(
        first.team,
        first.mode,
        tuple(s for r in runs for s in r.scores),
        tuple(a for r in runs for a in r.answers),
        tuple(c for r in runs for c in r.calls),
        sum(r.wall_s for r in runs),
    )


def _mode_result(team: Team, run: TeamRun) -> TeamModeResult:
    agg = aggregate(run.calls)
    return TeamModeResult(
        mode=run.mode,
        score=run.score,
        token_reuse=agg.reuse_rate,
        calls=len(run.calls),
        mean_kl=agg.mean_kl,
        top1_agree=agg.top1_agree_rate,
        median_greedy_match=agg.median_greedy_match,
        wall_s=run.wall_s,
        agents=_agent_rows(team, run.calls),
        answers=list(run.answers),
    )


def run_team_bench(
    base: Engine,
    team: Team,
    items: Sequence[Any],
    modes: Sequence[str] = ("full", "prefix", "kvshare"),
    shadow: bool = True,
    progress: bool = True,
    wrapper: bool = True,
    idle_teach: bool = False,
    gap_s: float = 0.0,
    max_concurrency: int = 1,
) -> TeamReport:
    """``team`` over ``items`` under each of ``modes`` (``full`` is never shadowed: it is
    the oracle), plus (``wrapper``) the wrapper's cost per call. ``idle_teach``: anchored
    modes teach in the ``gap_s`` idle seconds after each of their workflow runs (their
    pending jobs are dropped before the next mode runs). ``max_concurrency``: parallel
    branches of a superstep at once (``run_team``)."""
    from kvshare.bench.wrapper import measure as wrapper_cost

    base.fork(mode="full").chat([{"role": "user", "content": "Hello"}], max_new_tokens=2)
    forks = {m: base.fork(mode=m, idle_teach=idle_teach) for m in modes}
    idle: dict[str, list[IdleStats]] = {}
    graphs = {m: team_graph(team, forks[m], shadow and m != "full") for m in modes}
    runs: dict[str, list[TeamRun]] = {m: [] for m in modes}
    bar = tqdm(total=len(items) * len(modes), desc=team.name, unit="run", disable=not progress)
    for k, item in enumerate(items):
        for m in modes:
            runs[m].append(run_team(forks[m], team, [item], first=k, graph=graphs[m],
                                    max_concurrency=max_concurrency))  # fmt: skip
            if forks[m].teacher is not None:
                time.sleep(gap_s)
                pause_teaching(forks[m], idle, m)
            bar.update()
    bar.close()
    return TeamReport(
        team=team.name,
        title=team.title,
        score_name=team.score_name,
        items=sum(len(i) if isinstance(i, tuple) else 1 for i in items),  # code: problems
        machine=machine_description(base),
        torch=torch.__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        modes=[_mode_result(team, _merge(runs[m])) for m in modes],
        wrapper=wrapper_cost(base, calls=20) if wrapper else {},
        gap_s=gap_s,
        idle={m: idle_summary(p) for m, p in idle.items()},
        max_concurrency=max_concurrency,
    )


def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def markdown(rep: TeamReport) -> str:
    """Per-mode summary and per-agent reuse / TTFT tables."""
    w = rep.wrapper
    cost = (
        f" Wrapper overhead: {w['overhead_ms']:.2f} ms per call (ChatKVShare.invoke "
        f"{w['chat_kvshare_ms']:.2f} ms vs Engine.chat {w['engine_chat_ms']:.2f} ms, median)."
        if w
        else ""
    )
    lines = [
        f"Team `{rep.team}` ({rep.title}), {rep.items} item(s). Machine: {rep.machine}, "
        f"torch {rep.torch}; modes interleaved per item; {rep.max_concurrency} branch(es) of a "
        f"superstep at once.{cost}",
        "",
        f"| mode | {rep.score_name} | token reuse | calls | mean KL | top-1 | greedy match "
        "| wall (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in rep.modes:
        lines.append(
            f"| {m.mode} | {m.score:.1f} | {m.token_reuse:.1%} | {m.calls} | "
            f"{_fmt(m.mean_kl, '.4f')} | {_fmt(m.top1_agree, '.0%')} | "
            f"{_fmt(m.median_greedy_match, '.0f')} | {m.wall_s:.1f} |"
        )
    lines += idle_lines(rep.idle, rep.gap_s, "workflow run")
    lines += ["", "Per agent: token reuse, median TTFT (s):", ""]
    rows = {
        agent: [_agent_cell(m, agent) for m in rep.modes]
        for agent in dict.fromkeys(a.agent for m in rep.modes for a in m.agents)
    }
    return "\n".join(lines + agent_grid([m.mode for m in rep.modes], rows)) + "\n"


def _agent_cell(mode: TeamModeResult, agent: str) -> str:
    row = next((a for a in mode.agents if a.agent == agent), None)
    return "–" if row is None else f"{row.token_reuse:.0%}, {row.median_ttft_s:.3f}"


def write(rep: TeamReport, out_dir: Path) -> dict[str, Path]:
    """``team-<name>.json`` and ``.md`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"team-{rep.team}"
    paths = {"json": stem.with_suffix(".json"), "md": stem.with_suffix(".md")}
    paths["json"].write_text(rep.model_dump_json(indent=1))
    paths["md"].write_text(markdown(rep))
    return paths
