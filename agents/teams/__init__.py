"""Reference teams: who the agents are and what each one is told.

``get_team(name)``: the three reference workflows (``rag``, ``debate``, ``code``), each a
LangGraph graph of ``ChatKVShare`` agents over real task data, scored
(``kvshare.agents.teams.base.Team``). ``QA_TEAM`` below is the demo's four-agent team.

One definition, used by ``kvshare demo`` and ``kvshare bench --workload qa``; the workflows
differ only in how they lay the shared document out (``kvshare.demo``: document first;
``kvshare.bench.workloads.QAWorkload``: each agent's role first).
"""

from __future__ import annotations

from kvshare.agents.teams.base import Team

from kvshare.errors import ConfigError

QA_TEAM: tuple[tuple[str, str], ...] = (
    ("reader", "You are the reader. Quote the sentence of the document that answers the question."),
    (
        "answerer",
        "You are the answerer. Answer the question in a few words, using the "
        "document and the reader's quote.",
    ),
    (
        "critic",
        "You are the critic. Check the earlier answers against the document and say "
        "briefly whether they are right.",
    ),
    ("judge", "You are the judge. Reply with only the final answer, in a few words."),
)
"""(agent name, role instruction) of the four-agent question-answering team, in order."""

TEAM_NAMES = ("rag", "debate", "code")


def get_team(name: str) -> Team:
    """The reference team ``name`` (``rag``, ``debate`` or ``code``) with default settings;
    its modules (LangGraph, the data files) load on first use."""
    if name == "rag":
        from kvshare.agents.teams.rag import RagTeam

        return RagTeam()
    if name == "debate":
        from kvshare.agents.teams.debate import DebateTeam

        return DebateTeam()
    if name == "code":
        from kvshare.agents.teams.code import CodeTeam

        return CodeTeam()
    raise ConfigError(f"unknown team {name!r}; choose from {TEAM_NAMES}")
