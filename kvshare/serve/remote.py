"""A reference team (``kvshare.agents.teams``) run against a ``kvshare serve`` endpoint through
LangChain's ``ChatOpenAI``: the agent code of a user who never imports kvshare.

Each agent is a ``ChatOpenAI`` that names itself and its item's session in the
``X-KVShare-Agent`` / ``X-KVShare-Session`` headers; a superstep's branches run one at a time
(as ``run_team``'s default, so a run is reproducible). Token reuse is read from the server's
``/metrics`` before and after the run (reused / (reused + computed) prompt tokens), so it
counts every call the server served meanwhile.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass(frozen=True)
class RemoteRun:
    """scores (0..1) and answers per item, prompt tokens reused and computed on the server."""

    team: str
    scores: tuple[float, ...]
    answers: tuple[str, ...]
    reused: float
    computed: float

    @property
    def reuse(self) -> float:
        total = self.reused + self.computed
        return self.reused / total if total else 0.0


def prompt_tokens(base: str) -> tuple[float, float]:
    """(reused, computed) prompt tokens the server at ``base`` (no ``/v1``) has served."""
    text = httpx.get(f"{base}/metrics", timeout=30).text
    found = dict(re.findall(r'kvshare_prompt_tokens_total\{kind="(\w+)"\} (\S+)', text))
    return float(found.get("reused", 0)), float(found.get("computed", 0))


def run_team_remote(
    base: str, team_name: str, items: int | None = None, api_key: str = "unused"
) -> RemoteRun:
    """Run ``team_name`` on ``items`` items (default: the team's) against the server at
    ``base`` (``http://host:port``, no ``/v1``)."""
    from langchain_openai import ChatOpenAI

    from kvshare.agents.teams import get_team

    team = get_team(team_name)
    headers = {"Authorization": f"Bearer {api_key}"}
    model = httpx.get(f"{base}/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
    before = prompt_tokens(base)
    scores, answers = [], []
    for k, item in enumerate(team.items(items or team.default_items)):

        def agent(name: str, thread: str = f"{team.name}-{k}") -> Any:
            options: dict[str, Any] = dict(
                base_url=f"{base}/v1", api_key=api_key, model=model, temperature=0,
                max_tokens=team.max_tokens[name], max_retries=0, timeout=600,
                default_headers={"X-KVShare-Agent": name, "X-KVShare-Session": thread},
            )  # fmt: skip
            return ChatOpenAI(**options)

        graph = team.build({a: agent(a) for a in team.agents})
        state = graph.invoke(team.inputs(item), {"max_concurrency": 1})
        scores.append(team.score(item, state))
        answers.append(team.answer(state))
    after = prompt_tokens(base)
    return RemoteRun(
        team.name, tuple(scores), tuple(answers), after[0] - before[0], after[1] - before[1]
    )
