"""The agent API: Agent, Session and engine hints (recorded, never changing outputs)."""

from __future__ import annotations

import pytest
from kvshare.agents import Agent, Session

from kvshare.errors import ConfigError, ScopeError

from factories import DOC

ROLES = ("planner", "critic", "judge")


def _team(engine):
    return [Agent(r, f"You are the {r}. Be brief.", engine) for r in ROLES]


def test_a_session_hints_what_runs_next_and_outputs_do_not_change(tiny_engine):
    plain = tiny_engine.fork(mode="kvshare")
    expected = [plain.chat([{"role": "system", "content": f"You are the {r}. Be brief."},
                            {"role": "user", "content": DOC}], agent=r, max_new_tokens=4).tokens
                for r in ROLES]  # fmt: skip
    eng = tiny_engine.fork(mode="kvshare")
    with Session(_team(eng), id="run-1", order=ROLES) as s:
        got = [s.chat(r, DOC, max_new_tokens=4).tokens for r in ROLES]
    assert got == expected  # hints never change outputs
    hints = eng.hints("run-1")
    assert [(h.running, h.next, h.release) for h in hints] == [
        (None, ROLES, ()),
        ("planner", ("critic", "judge"), ()),
        ("critic", ("judge",), ()),
        ("judge", (), ()),
        (None, (), ROLES),
    ]
    assert eng.stats("run-1").hints == 5 and eng.stats("other").hints == 0
    assert [(c.agent, c.session) for c in eng.calls] == [(r, "run-1") for r in ROLES]
    eng.reset()
    assert eng.hints() == []


def test_a_graph_session_hints_successors(tiny_engine):
    eng = tiny_engine.fork(mode="prefix")
    graph = {"planner": ["critic", "judge"], "critic": ["judge"]}
    s = Session(_team(eng), order=("planner",), successors=graph)
    assert s.next_after(None) == ("planner",) and s.next_after("planner") == ("critic", "judge")
    assert s.next_after("judge") == () and s.id.startswith("session-")


def test_bad_agents_sessions_and_hints_are_refused(tiny_engine):
    eng = tiny_engine.fork(mode="prefix")
    with pytest.raises(ConfigError):
        Agent("", "x", eng)
    with pytest.raises(ConfigError, match="distinct"):
        Session([Agent("a", "x", eng), Agent("a", "y", eng)])
    with pytest.raises(ConfigError, match="lacks"):
        Session(_team(eng), order=("planner", "ghost"))
    with pytest.raises(ConfigError, match="same engine"):
        Session([Agent("a", "x", eng), Agent("b", "y", eng.fork())])
    with pytest.raises(ConfigError, match="not part"):
        Session(_team(eng)).chat("ghost", "hi")
    with pytest.raises(ScopeError):
        eng.hint(7, running="planner")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="session id"):
        eng.hint(None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="list of agent names"):
        eng.hint("s", next="critic")
    with pytest.raises(ConfigError, match="ttl"):
        eng.hint("s", ttl=-1.0)
    with pytest.raises(ScopeError):
        eng.hint("s", release=[3])
    assert eng.hints() == []  # nothing recorded by a refused hint


def test_an_agent_with_tools_puts_the_tool_block_first(tiny_engine):
    from kvshare.integrations.tools import tool_block

    def lookup(term: str) -> str:
        """Look a term up."""
        return term

    agent = Agent("researcher", "You research.", tiny_engine, tools=[lookup])
    msgs = agent.messages("What is a ledger?")
    assert msgs[0]["content"].startswith(tool_block([])[:40]) and '"lookup"' in msgs[0]["content"]
    assert msgs[1] == {"role": "system", "content": "You research."}
