"""The reference teams through ChatOpenAI against a server: the answers and the token reuse
of the same team run in process (``run_team`` on ChatKVShare), prefix mode."""

from __future__ import annotations

import pytest
from kvshare.agents.teams import get_team
from kvshare.agents.teams.base import run_team

from kvshare.cli import main
from kvshare.serve.remote import run_team_remote

from serving import served


@pytest.mark.parametrize("name", ["rag", "debate", "code"])
def test_team_via_server_equals_team_in_process(tiny_engine, name):
    team = get_team(name)
    local = run_team(tiny_engine.fork(mode="prefix"), team, team.items(1))
    prompt = sum(c.prompt_tokens for c in local.calls)
    reuse = sum(c.prompt_tokens - c.computed_tokens for c in local.calls) / prompt
    with served(tiny_engine.fork(mode="prefix")) as server:
        remote = run_team_remote(server.base, name, 1)
        calls = server.state.engine.calls
    assert remote.answers == local.answers and remote.scores == local.scores
    assert abs(remote.reuse - reuse) <= 0.02 and remote.reused + remote.computed == prompt
    assert sorted({c.agent for c in calls}) == sorted(team.agents)
    assert {c.session for c in calls} == {f"{name}-0"}


def test_demo_server_flag_prints_the_teams_reuse(tiny_engine, capsys):
    with served(tiny_engine.fork(mode="prefix")) as server:
        assert main(["demo", "--workflow", "debate", "--items", "1", "--server", server.base]) == 0
    out = capsys.readouterr().out
    assert "debate via http://127.0.0.1:" in out and "token reuse" in out
    assert main(["demo", "--server", "http://127.0.0.1:1"]) == 2  # no --workflow
