"""Precomputed system prompts (``kvshare bench --workload tiers``, second table): each agent's
first call with and without its static prompt precomputed beforehand (``Engine.precompute``,
what the prefetcher does in the gap before an agent's turn), and its markdown table."""

from __future__ import annotations

from pydantic import BaseModel

from kvshare.bench.workloads import SyntheticWorkload
from kvshare.engine.engine import Engine


class WarmRow(BaseModel):
    """One agent's first call with and without its static prompt precomputed."""

    agent: str
    prompt_tokens: int
    cold_ttft_s: float
    warm_ttft_s: float
    cold_reuse: float
    warm_reuse: float
    same_output: bool


def precompute_gain(base: Engine, wl: SyntheticWorkload, mode: str = "kvshare") -> list[WarmRow]:
    """The first item of ``wl`` twice on fresh forks: as is, and with every agent's system
    prompt precomputed (``Engine.precompute``, what the prefetcher does in the gap before an
    agent's turn; not timed) right before its call."""
    runs = {}
    for warm in (False, True):
        engine = base.fork(mode=mode)
        outputs: list[str] = []
        stats = []
        for i in range(wl.n_agents):
            msgs = wl.messages(i, outputs, 0)
            name = wl.agent_name(i)
            if warm:
                engine.precompute(msgs[:1], agent=name, session="bench")
            r = engine.chat(msgs, agent=name, session="bench", max_new_tokens=wl.max_new_tokens)
            outputs.append(r.text)
            stats.append(r)
        runs[warm] = stats
    return [
        WarmRow(
            agent=wl.agent_name(i),
            prompt_tokens=cold.stats.prompt_tokens,
            cold_ttft_s=cold.stats.ttft_s,
            warm_ttft_s=hot.stats.ttft_s,
            cold_reuse=cold.stats.reuse_rate,
            warm_reuse=hot.stats.reuse_rate,
            same_output=cold.text == hot.text,
        )
        for i, (cold, hot) in enumerate(zip(runs[False], runs[True], strict=True))
    ]


def warm_markdown(rows: list[WarmRow], mode: str, when: str = "beforehand") -> str:
    lines = [
        f"First call of each agent ({mode} mode), with and without its static prompt "
        f"precomputed {when}:",
        "",
        "| agent | prompt tokens | TTFT cold (s) | TTFT precomputed (s) | ratio | reuse cold | "
        "reuse precomputed | same output |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.agent} | {r.prompt_tokens} | {r.cold_ttft_s:.3f} | {r.warm_ttft_s:.3f} | "
            f"{r.warm_ttft_s / r.cold_ttft_s:.2f} | {r.cold_reuse:.0%} | {r.warm_reuse:.0%} | "
            f"{'yes' if r.same_output else 'no'} |"
        )
    return "\n".join(lines) + "\n"
