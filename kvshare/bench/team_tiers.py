"""Tiers and prefetch on the reference teams (``kvshare bench --workload tiers --team NAME``).

- :func:`team_pressure`: a team under memory pressure, workflow policy + prefetch vs LRU
  without prefetch, over a disk tier or nothing, ``kvshare`` mode, radix cache off;
- :func:`precompute_gain`: each agent's first call with its static prompt (role prompt, tool
  block, the item's shared context: ``Team.static_prompts``) precomputed before its turn vs
  not; the precompute is done before the item's run and not timed, as if the prefetcher had
  a gap before each agent's turn;
- :func:`live_prefetch`: the same with the prefetcher doing it for real (static prompts
  registered, hints from the wrapped graph), so a call that comes right after the previous
  one waits for the precompute: what a workflow without gaps gets.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

from kvshare.bench.tiers import TierRow, WarmRow, policy_engine, tier_row
from kvshare.engine.engine import Engine
from kvshare.engine.stats import CallStats


def _run(engine: Engine, team: Any, items: Sequence[Any], **options: Any) -> Any:
    from kvshare.agents.teams.base import run_team

    return run_team(engine, team, items, **options)


def working_set(base: Engine, team: Any, items: Sequence[Any]) -> int:
    """The most trace bytes one item's run writes (a store with no limit, radix cache off)."""
    probe = policy_engine(base, "workflow", 1 << 40, None)
    marks: list[int] = []
    _run(probe, team, items, before_item=lambda *_: marks.append(probe.segments.bytes_used))
    marks.append(probe.segments.bytes_used)
    return max(b - a for a, b in zip(marks, marks[1:], strict=False))


def team_pressure(
    base: Engine,
    team: Any,
    items: Sequence[Any],
    fraction: float = 0.25,
    lowers: Sequence[str] = ("disk", "none"),
) -> tuple[int, list[TierRow]]:
    """``team`` (a wrapped LangGraph graph: its calls hint the engine) with the device tier at
    ``fraction`` of one item's working set: workflow + prefetch vs LRU without prefetch,
    over each of ``lowers``. Answers compared within a lower tier."""
    total = working_set(base, team, items)
    device = max(1, int(fraction * total))
    rows = []
    for lower in lowers:
        reference = None
        for policy in ("workflow", "lru"):
            disk = tempfile.mkdtemp(prefix="kvshare-team-tiers-") if lower == "disk" else None
            try:
                engine = policy_engine(base, policy, device, disk)
                run = _run(engine, team, items)
            finally:
                if disk is not None:
                    shutil.rmtree(disk, ignore_errors=True)
            reference = run.answers if reference is None else reference
            same = run.answers == reference
            rows.append(tier_row(policy, fraction, device, engine, list(run.calls), same, 0, lower))
            if engine.prefetcher is not None:
                engine.prefetcher.close()
    return total, rows


def _first_calls(calls: Sequence[CallStats]) -> dict[str, CallStats]:
    firsts: dict[str, CallStats] = {}
    for c in calls:
        firsts.setdefault(str(c.agent), c)
    return firsts


def _pair(team: Any, cold: Any, warm: Any) -> list[WarmRow]:
    a, b = _first_calls(cold.calls), _first_calls(warm.calls)
    return [
        WarmRow(
            agent=agent,
            prompt_tokens=a[agent].prompt_tokens,
            cold_ttft_s=a[agent].ttft_s,
            warm_ttft_s=b[agent].ttft_s,
            cold_reuse=a[agent].reuse_rate,
            warm_reuse=b[agent].reuse_rate,
            same_output=cold.answers == warm.answers,
        )
        for agent in team.agents
        if agent in a and agent in b
    ]


def cold_run(base: Engine, team: Any, items: Sequence[Any], mode: str = "kvshare") -> Any:
    """``team`` over ``items`` on a fresh fork in ``mode``, prefetcher off: the baseline of
    :func:`precompute_gain` and :func:`live_prefetch` (run it once, pass it to both)."""
    return _run(base.fork(mode=mode, prefetch=False), team, items)


def precompute_gain(
    base: Engine, team: Any, items: Sequence[Any], mode: str = "kvshare", cold: Any = None
) -> list[WarmRow]:
    """Per agent, its first call in a run of ``team`` over ``items`` (fresh forks, prefetcher
    off): as is (``cold``, from :func:`cold_run` when None), and with every agent's static
    prompts of the item precomputed before the item's run (not timed). ``same_output``: the
    whole run's answers agree."""

    def warm_up(engine: Engine) -> Callable[[str, Any], None]:
        def before(thread: str, item: Any) -> None:
            for agent, messages in team.static_prompts(item).items():
                engine.precompute(messages, agent=agent, session=thread)

        return before

    cold = cold if cold is not None else cold_run(base, team, items, mode)
    engine = base.fork(mode=mode, prefetch=False)
    warm = _run(engine, team, items, before_item=warm_up(engine))
    return _pair(team, cold, warm)


def live_prefetch(
    base: Engine, team: Any, items: Sequence[Any], mode: str = "kvshare", cold: Any = None
) -> tuple[list[WarmRow], float, float]:
    """Per agent, its first call with the prefetcher off (``cold``, from :func:`cold_run`
    when None) vs on (static prompts registered, precomputed when a wrapped node's hint
    names the agent next, after the running call): rows, and the two runs' wall times (s)."""
    cold = cold if cold is not None else cold_run(base, team, items, mode)
    engine = base.fork(mode=mode, prefetch=True)
    try:
        live = _run(engine, team, items, static=True)
    finally:
        if engine.prefetcher is not None:
            engine.prefetcher.close()
    return _pair(team, cold, live), cold.wall_s, live.wall_s
