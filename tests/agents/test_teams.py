"""Reference teams: data loading, graph logic with scripted models, scoring, a real run."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import pytest
from kvshare.agents.teams import TEAM_NAMES, get_team
from kvshare.agents.teams.base import last_number, run_team
from kvshare.agents.teams.code import CodeTeam, extract_code
from kvshare.agents.teams.data import code_items, math_items
from kvshare.agents.teams.debate import DebateTeam
from kvshare.agents.teams.rag import RagTeam
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult

from kvshare.bench.corpus import NARRATIVEQA_TINY, qa_items
from kvshare.errors import ConfigError


class Scripted(BaseChatModel):
    """Replies ``reply(agent, messages)``; records (agent, messages) of every call."""

    agent: str
    reply: Callable[[str, list[BaseMessage]], str]
    log: Any  # shared by every agent of a team (Any: pydantic would copy a list)

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def _generate(self, messages: list[BaseMessage], stop: Any = None, **kw: Any) -> ChatResult:
        self.log.append((self.agent, messages))
        text = self.reply(self.agent, messages)
        return ChatResult(generations=[ChatGeneration(message=AIMessage(text))])


def scripted(team: Any, reply: Callable[[str, list[BaseMessage]], str]) -> tuple[dict, list]:
    log: list[tuple[str, list[BaseMessage]]] = []
    return {a: Scripted(agent=a, reply=reply, log=log) for a in team.agents}, log


def run(team: Any, models: dict, item: Any) -> dict:
    return team.build(models).invoke(team.inputs(item), {"max_concurrency": 1})


# --- data -----------------------------------------------------------------------------------


def test_math_items_are_real_problems_with_numeric_answers_and_leave_no_stub_module():
    items = math_items(3)
    assert len({i.question for i in items}) == 3
    assert items[0].question.startswith("Isabella can peel 4 mushrooms")  # generator 0, seed 0
    assert items[0].answer == 220.0
    assert "reasoning_gym" not in sys.modules  # loaded by path; nothing left behind
    assert math_items(2, offset=1) == items[1:]


def test_code_items_come_short_first_with_tests_and_entry_points():
    items = code_items(2)
    assert [i.task_id for i in items] == ["HumanEval/53", "HumanEval/23"]
    assert all("def check(candidate)" in i.test for i in items)
    assert all(f"def {i.entry_point}" in i.prompt for i in items)


@pytest.mark.parametrize("bad", [(0, 0), (2, -1), (200, 0), (1, 10_000)])
def test_item_windows_out_of_range_are_refused(bad):
    n, offset = bad
    with pytest.raises(ConfigError):
        code_items(n, offset)
    with pytest.raises(ConfigError):
        RagTeam().items(n, offset)


def test_get_team_knows_three_and_refuses_others():
    assert [get_team(n).name for n in TEAM_NAMES] == ["rag", "debate", "code"]
    with pytest.raises(ConfigError, match="unknown team"):
        get_team("chess")


# --- scoring helpers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "want"),
    [
        ("So 12 + 3 = 15.\nAnswer: 15", 15.0),
        ("Answer: 1,250 dollars, not 3", 1250.0),
        ("it is 7 or maybe 8", 8.0),
        ("Answer: -2.5", -2.5),
        ("no idea", None),
    ],
)
def test_last_number(reply, want):
    assert last_number(reply) == want


def test_extract_code_takes_the_block_that_defines_the_entry_point_and_adds_imports():
    item = code_items(3)[2]  # HumanEval/2 truncate_number
    block = "Here:\n```python\ndef truncate_number(number: float) -> float:\n    return 0.5\n```"
    code = extract_code(block, item)
    assert "def truncate_number" in code and "return 0.5" in code and "```" not in code
    body = extract_code("    return number % 1.0\n", item)  # a completion of the prompt
    assert body.startswith(item.prompt) or item.prompt in body
    assert "return number % 1.0" in body


# --- graphs with scripted models ---------------------------------------------------------------


@pytest.mark.parametrize(("verdict", "extractions"), [("Yes, it does.", 1), ("No.", 2)])
def test_rag_rechecks_at_most_max_checks_then_answers(verdict, extractions):
    team = RagTeam(n_passages=3, max_checks=1)
    item = team.items(1)[0]
    answers = {"extractor": "quote", "verifier": verdict, "answerer": item.answers[0]}
    models, log = scripted(team, lambda agent, _: answers[agent])
    state = run(team, models, item)
    agents = [a for a, _ in log]
    assert agents.count("extractor") == extractions and agents[-1] == "answerer"
    assert team.score(item, state) == 1.0
    answerer_text = " ".join(str(m.content) for m in log[-1][1])
    assert ("Evidence: quote" in answerer_text) == verdict.startswith("Yes")  # only if accepted
    context = log[0][1][1].content
    assert all(p in context for p in item.passages) and len(item.passages) == 3


def test_rag_items_put_the_gold_passage_among_distinct_distractors():
    team = RagTeam(n_passages=2)
    rows = qa_items(NARRATIVEQA_TINY)
    for k, item in enumerate(team.items(2)):
        assert len(set(item.passages)) == 2
        assert item.passages.index(rows[k].context) == k % 2  # the gold slot rotates


def test_debate_runs_two_rounds_joined_then_the_judge_reads_the_final_solutions():
    team = DebateTeam(rounds=2)
    item = team.items(1)[0]
    gold = int(item.answer)

    def reply(agent: str, messages: list[BaseMessage]) -> str:
        n = sum(1 for m in messages if m.type == "ai")
        return f"Answer: {gold}" if agent == "judge" else f"{agent} round{n + 1}"

    models, log = scripted(team, reply)
    state = run(team, models, item)
    assert [a for a, _ in log] == ["solver_a", "solver_b", "solver_a", "solver_b", "judge"]
    judge_text = " ".join(str(m.content) for m in log[-1][1])
    assert "solver_a round2" in judge_text and "solver_b round2" in judge_text
    assert "round1" not in judge_text
    second_a = " ".join(str(m.content) for m in log[2][1])
    assert "solver_b round1" in second_a  # round 2 reads the other's round-1 solution
    assert team.score(item, state) == 1.0
    assert team.score(item, {"verdict": f"Answer: {gold + 1}"}) == 0.0


def test_code_team_fans_out_runs_tests_and_fixes_only_what_failed():
    team = CodeTeam()
    problems = team.items(2)[0]  # HumanEval/53 add, HumanEval/23 strlen
    good = {
        "add": "```python\ndef add(x: int, y: int):\n    return x + y\n```",
        "strlen": "```python\ndef strlen(string: str) -> int:\n    return len(string)\n```",
    }

    def reply(agent: str, messages: list[BaseMessage]) -> str:
        ask = str(messages[1].content)
        name = "add" if "def add" in ask else "strlen"
        if agent == "writer":
            return good[name] if name == "add" else "```python\ndef strlen(s):\n    return 0\n```"
        return "It returns 0." if agent == "reviewer" else good[name]

    models, log = scripted(team, reply)
    state = run(team, models, problems)
    assert [a for a, _ in log].count("writer") == 2
    assert [a for a, _ in log].count("reviewer") == 1 == [a for a, _ in log].count("fixer")
    outcomes = {r["task_id"]: (r["passed"], r["stage"]) for r in state["results"]}
    assert outcomes == {"HumanEval/53": (True, "writer"), "HumanEval/23": (True, "fixer")}
    assert team.score(problems, state) == 1.0
    reviewer_msgs = next(m for a, m in log if a == "reviewer")
    assert any(m.type == "tool" and m.content.startswith("failed") for m in reviewer_msgs)


def test_code_team_contains_hostile_generated_code_in_the_score():
    team = CodeTeam()
    problems = team.items(1)[0]
    hostile = "```python\nimport os\ndef add(x, y):\n    os.fork()\n    return x + y\n```"
    models, _ = scripted(team, lambda agent, _: "bad" if agent == "reviewer" else hostile)
    state = run(team, models, problems)
    assert state["results"] == [
        {"task_id": "HumanEval/53", "passed": False, "status": "blocked", "stage": "fixer"}
    ]
    assert team.score(problems, state) == 0.0


def test_code_team_with_no_problems_is_a_named_error():
    with pytest.raises(ConfigError, match="at least one problem"):
        run(CodeTeam(), scripted(CodeTeam(), lambda *_: "")[0], [])


# --- the real model ----------------------------------------------------------------------------


@pytest.mark.model
def test_rag_team_on_the_real_model_reuses_earlier_agents_kv(real_engine):
    team = RagTeam(n_passages=1, max_checks=0)
    engine = real_engine.fork(mode="kvshare")
    run = run_team(engine, team, team.items(1))
    later = [c for c in run.calls if c.agent != "extractor"]
    assert [c.agent for c in run.calls] == ["extractor", "verifier", "answerer"]
    assert all(c.relocated_tokens + c.prefix_hit_tokens > 0 for c in later)
    assert sum(c.computed_tokens for c in later) < 0.5 * sum(c.prompt_tokens for c in later)
    assert 0.0 <= run.score <= 100.0 and run.answers[0]


def test_a_team_under_memory_pressure_gives_the_same_answers_per_policy(tiny_dirs):
    from kvshare import Engine
    from kvshare.bench.team_tiers import team_pressure

    engine = Engine.from_pretrained(str(tiny_dirs["llama"]))
    team = RagTeam(n_passages=1, max_checks=0)
    total, rows = team_pressure(engine, team, team.items(2), fraction=0.3, lowers=("disk",))
    assert total > 0 and [r.policy for r in rows] == ["workflow", "lru"]
    assert all(r.same_outputs and r.device_bytes == int(0.3 * total) for r in rows)
    assert all(sum(r.moved_bytes.values()) > 0 for r in rows)  # the disk tier was used


@pytest.mark.parametrize("name", TEAM_NAMES)
def test_static_prompts_are_exact_prefixes_of_each_agents_first_call(tiny_dirs, name):
    """Precomputed before the run, every agent's static prompt makes its first call an exact
    prefix hit over all of it (but the generation header), and nothing else changes."""
    from kvshare import Engine, EngineConfig

    team = get_team(name)
    items = team.items(1)
    statics = team.static_prompts(items[0])
    assert set(statics) == set(team.agents)
    engine = Engine.from_pretrained(str(tiny_dirs["llama"]), config=EngineConfig(mode="prefix"))
    sizes: dict[str, int] = {}

    def before(thread: str, item: Any) -> None:
        for agent, messages in team.static_prompts(item).items():
            sizes[agent] = engine.precompute(messages, agent=agent, session=thread)

    warm = run_team(engine, team, items, before_item=before)
    cold = run_team(engine.fork(), team, items)
    firsts = {c.agent: c for c in reversed(warm.calls)}
    assert firsts and all(firsts[a].prefix_hit_tokens >= sizes[a] - 4 for a in firsts)
    assert warm.answers == cold.answers  # prefix mode is exact
    assert engine.stats().calls == len(warm.calls)  # a precompute is not a call


def test_run_team_releases_each_items_agents_and_registers_static_prompts(tiny_dirs):
    from kvshare import Engine

    engine = Engine.from_pretrained(str(tiny_dirs["llama"]))
    team = RagTeam(n_passages=1, max_checks=0)
    run_team(engine, team, team.items(1), static=True)
    last = engine.hints("rag-0")[-1]
    assert last.release == team.agents and last.running is None
    assert engine.prefetcher is not None and engine.prefetcher.drain()
    assert engine.prefetcher.warmed >= 2  # verifier and answerer, each after the call before


def test_team_bench_idle_teaching_runs_in_the_gap_after_each_workflow(tiny_engine):
    from kvshare.bench.teams import markdown, run_team_bench

    team = get_team("rag")
    rep = run_team_bench(
        tiny_engine, team, team.items(2), ["full", "kvshare"], progress=False, wrapper=False,
        idle_teach=True, gap_s=0.5,
    )  # fmt: skip
    assert rep.gap_s == 0.5 and list(rep.idle) == ["kvshare"]
    idle = rep.idle["kvshare"]
    assert idle["offered"] >= 1 and idle["taught"] >= 1 and idle["waited_calls"] == 0
    assert "0.5 s idle after each workflow run" in markdown(rep)


@pytest.mark.parametrize("name", ["debate", "code"])
def test_parallel_branches_run_at_once_with_the_serial_answers(tiny_engine, name):
    """``max_concurrency=2``: the debate's two solvers (the code team's fan-out) run at once
    and their decodes batch; in ``full`` mode every call equals the serial run's."""
    team = get_team(name)
    items = team.items(2 if name == "code" else 1)  # code: one run fanning out over two
    serial = run_team(tiny_engine.fork(mode="full"), team, items)
    eng = tiny_engine.fork(mode="full")
    together = run_team(eng, team, items, max_concurrency=2)
    assert together.answers == serial.answers
    key = lambda c: (c.agent, c.prompt_tokens)  # noqa: E731
    assert sorted(map(key, together.calls)) == sorted(map(key, serial.calls))
    assert eng.batcher.stats()["mean_batch"] > 1
    with pytest.raises(ConfigError, match="max_concurrency"):
        run_team(eng, team, items, max_concurrency=0)
