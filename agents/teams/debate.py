"""Math debate team: two solvers, ``rounds`` rounds, a join, then a judge.

Round 1: both solvers solve the problem (one superstep, parallel branches). Each later
round: each solver reads its own previous solution and the other's, and revises. A join
waits for both solvers before the round counter moves and before the judge, who reads both
final solutions and states the answer. Scored numerically: the judge's answer (the number
after its last ``Answer:``, else its last number) against the generator's answer.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, TypedDict

from kvshare.agents.teams.base import Models, Team, last_number, text
from kvshare.agents.teams.data import MathItem, math_items

from kvshare.errors import ConfigError

PREAMBLE = (
    "You are one agent of a team that solves math word problems. Work with whole numbers "
    "where you can and end every solution with a line 'Answer: <number>'.\n"
)
ROLES = {
    "solver_a": "You are solver A. Write the equations step by step.",
    "solver_b": "You are solver B. Reason in short sentences and check the result.",
    "judge": "You are the judge. Read both solutions and state the correct final answer.",
}
SOLVERS = ("solver_a", "solver_b")


class Reply(TypedDict):
    agent: str
    round: int
    text: str


class DebateState(TypedDict, total=False):
    question: str
    round: int
    replies: Annotated[list[Reply], operator.add]
    verdict: str


def _latest(state: Mapping[str, Any], agent: str) -> str:
    mine = [r["text"] for r in state.get("replies", []) if r["agent"] == agent]
    return mine[-1] if mine else ""


def _solver_messages(agent: str, state: Mapping[str, Any]) -> list[tuple[str, str]]:
    msgs = [("system", PREAMBLE + ROLES[agent]), ("user", state["question"])]
    if state.get("round", 1) == 1:
        return msgs + [("user", "Solve the problem.")]
    other = SOLVERS[1 - SOLVERS.index(agent)]
    return msgs + [
        ("user", "Solve the problem."),
        ("assistant", _latest(state, agent)),
        ("user", f"The other solver wrote:\n{_latest(state, other)}"),
        ("user", "Check both solutions and give your final solution."),
    ]


@dataclass(frozen=True)
class DebateTeam(Team):
    """``rounds`` >= 1 rounds of the two solvers before the judge."""

    rounds: int = 2
    name: ClassVar[str] = "debate"
    title: ClassVar[str] = "Math debate over GSM-style word problems"
    agents: ClassVar[tuple[str, ...]] = (*SOLVERS, "judge")
    max_tokens: ClassVar[Mapping[str, int]] = {"solver_a": 64, "solver_b": 64, "judge": 12}
    default_items: ClassVar[int] = 3
    score_name: ClassVar[str] = "accuracy"

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigError("DebateTeam needs rounds >= 1")

    def items(self, n: int, offset: int = 0) -> Sequence[MathItem]:
        return math_items(n, offset)

    def build(self, models: Models) -> Any:
        from langgraph.graph import END, START, StateGraph

        def solver(agent: str) -> Any:
            def run(state: DebateState) -> DebateState:
                reply = models[agent].invoke(_solver_messages(agent, state))
                return {"replies": [Reply(agent=agent, round=state["round"], text=text(reply))]}

            return run

        def gather(state: DebateState) -> DebateState:
            return {"round": state["round"] + 1}

        def route(state: DebateState) -> list[str]:
            return list(SOLVERS) if state["round"] <= self.rounds else ["judge"]

        def judge(state: DebateState) -> DebateState:
            msgs = [("system", PREAMBLE + ROLES["judge"]), ("user", state["question"])]
            msgs += [("user", f"Solver {a[-1].upper()}:\n{_latest(state, a)}") for a in SOLVERS]
            msgs += [("user", "Reply with only the correct final answer: 'Answer: <number>'.")]
            return {"verdict": text(models["judge"].invoke(msgs))}

        g = StateGraph(DebateState)
        for agent in SOLVERS:
            g.add_node(agent, solver(agent))
            g.add_edge(START, agent)
        g.add_node("gather", gather)
        g.add_node("judge", judge)
        g.add_edge(list(SOLVERS), "gather")  # the join: both solvers of the round
        g.add_conditional_edges("gather", route, [*SOLVERS, "judge"])
        g.add_edge("judge", END)
        return g.compile()

    def static_prompts(self, item: MathItem) -> dict[str, list[Any]]:
        """Every agent's role prompt and the problem."""
        return {a: [("system", PREAMBLE + ROLES[a]), ("user", item.question)] for a in self.agents}

    def inputs(self, item: MathItem) -> dict[str, Any]:
        return {"question": item.question, "round": 1, "replies": []}

    def score(self, item: MathItem, state: Mapping[str, Any]) -> float:
        got = last_number(state.get("verdict", ""))
        return float(got is not None and abs(got - item.answer) <= 1e-6 * max(1.0, item.answer))

    def answer(self, state: Mapping[str, Any]) -> str:
        return str(state.get("verdict", ""))
