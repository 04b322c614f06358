"""Code team: a ``Send`` fan-out over HumanEval problems into a writer -> tests -> reviewer
-> fixer subgraph.

The writer completes the function; a ``run_tests`` tool call runs the problem's tests in the
sandbox (``kvshare.agents.sandbox``) and its report goes back as a ``ToolMessage``; code that
passes is done, otherwise the reviewer (who may call ``run_tests`` itself, once) explains the
failure and the fixer rewrites the function. Every agent has ``run_tests`` bound, so every
prompt starts with the same tool block. pass@1: the share of problems whose final code
passes its tests (judged outside the sandbox, which is an OS boundary: ``sandbox_os``).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, TypedDict

from kvshare.agents.teams.base import Models, Team, text
from kvshare.agents.teams.data import CodeItem, code_items

from kvshare.errors import ConfigError

PREAMBLE = "You are one agent of a team that writes Python functions that pass their tests.\n"
ROLES = {
    "writer": "You are the writer. Complete the function. Reply with one Python code block.",
    "reviewer": "You are the reviewer. Read the code and its test report and say briefly what "
    "is wrong.",
    "fixer": "You are the fixer. Rewrite the whole function so that it passes. Reply with one "
    "Python code block.",
}
TOOL = "run_tests"
FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|$)", re.S)


def run_tests() -> str:
    """Run the problem's unit tests on the team's latest code and report the result."""
    raise NotImplementedError("schema only: the graph runs the tests in the sandbox")


class Outcome(TypedDict):
    task_id: str
    passed: bool
    status: str
    stage: str  # "writer" (first code passed) or "fixer"


class SolveState(TypedDict, total=False):
    problem: CodeItem
    draft: str
    code: str
    history: list[Any]
    review: str
    results: Annotated[list[Outcome], operator.add]


class CodeState(TypedDict, total=False):
    problems: list[CodeItem]
    results: Annotated[list[Outcome], operator.add]


def _with_tool(model: Any) -> Any:
    """``model`` with ``run_tests`` bound: every agent's prompt then starts with the same
    tool block (an exact prefix shared by the whole team); a model without tool support is
    used as it is."""
    try:
        return model.bind_tools([run_tests])
    except NotImplementedError:
        return model


def extract_code(reply: str, item: CodeItem) -> str:
    """The program a reply stands for: its code block (or the reply) if it defines the entry
    point, else the reply as the body that completes the prompt; the prompt's imports first."""
    blocks = FENCE.findall(reply)
    body = next((b for b in blocks if f"def {item.entry_point}" in b), blocks[0] if blocks else "")
    body = body or reply
    if f"def {item.entry_point}" not in body:
        body = item.prompt + body
    imports = [ln for ln in item.prompt.splitlines() if ln.startswith(("import ", "from "))]
    return "\n".join([*imports, body]) + "\n"


def _ask(item: CodeItem) -> str:
    return f"Complete this function:\n```python\n{item.prompt}```"


def _test(item: CodeItem, code: str, call_id: str) -> tuple[Any, Any, Any]:
    """A ``run_tests`` tool call on ``code``, its sandbox result and the ToolMessage."""
    from kvshare.agents.sandbox import run_tests
    from langchain_core.messages import AIMessage, ToolMessage

    call = AIMessage("", tool_calls=[{"name": TOOL, "args": {"code": code}, "id": call_id}])
    result = run_tests(code, item.test, item.entry_point)
    report = f"{result.status}\n{result.output}".strip()
    return call, result, ToolMessage(report, tool_call_id=call_id, name=TOOL)


@dataclass(frozen=True)
class CodeTeam(Team):
    """HumanEval problems fanned out with ``Send``, one writer/reviewer/fixer run each."""

    name: ClassVar[str] = "code"
    title: ClassVar[str] = "Code team over HumanEval problems"
    agents: ClassVar[tuple[str, ...]] = ("writer", "reviewer", "fixer")
    max_tokens: ClassVar[Mapping[str, int]] = {"writer": 96, "reviewer": 32, "fixer": 96}
    default_items: ClassVar[int] = 3
    score_name: ClassVar[str] = "pass@1"

    def items(self, n: int, offset: int = 0) -> Sequence[tuple[CodeItem, ...]]:
        """One workflow run that fans out over problems ``offset..offset+n-1``."""
        return [code_items(n, offset)]

    def build(self, models: Models) -> Any:
        from langgraph.graph import END, START, StateGraph
        from langgraph.types import Send

        solve = self._solve_graph(models)

        def fan_out(state: CodeState) -> list[Any]:  # Sends (hints resolve at module level)
            if not state.get("problems"):
                raise ConfigError("the code team needs at least one problem")
            return [Send("solve", {"problem": p}) for p in state["problems"]]

        g = StateGraph(CodeState)
        g.add_node("solve", solve)
        g.add_conditional_edges(START, fan_out)
        g.add_edge("solve", END)
        return g.compile()

    def _solve_graph(self, models: Models) -> Any:
        from langgraph.graph import END, START, StateGraph

        bound = {a: _with_tool(models[a]) for a in self.agents}

        def writer(state: SolveState) -> SolveState:
            item = state["problem"]
            msgs = [("system", PREAMBLE + ROLES["writer"]), ("user", _ask(item))]
            draft = text(bound["writer"].invoke(msgs))
            call, result, report = _test(item, extract_code(draft, item), "call_writer")
            history = [*msgs, ("assistant", draft), call, report]
            done = Outcome(task_id=item.task_id, passed=True, status=result.status, stage="writer")
            return {
                "draft": draft,
                "code": extract_code(draft, item),
                "history": history,
                "results": [done] if result.passed else [],
            }

        def route(state: SolveState) -> Literal["reviewer", "__end__"]:
            return "__end__" if state.get("results") else "reviewer"  # passed: done

        def reviewer(state: SolveState) -> SolveState:
            msgs = [("system", PREAMBLE + ROLES["reviewer"]), *state["history"][1:]]
            reply = bound["reviewer"].invoke([*msgs, ("user", "What is wrong? Be brief.")])
            extra: list[Any] = []
            for call in getattr(reply, "tool_calls", [])[:1]:  # the reviewer's own test run
                _, _, report = _test(state["problem"], state["code"], str(call.get("id") or "c"))
                extra = [reply, report]
            return {"review": text(reply), "history": [*state["history"], *extra]}

        def fixer(state: SolveState) -> SolveState:
            item = state["problem"]
            msgs = [("system", PREAMBLE + ROLES["fixer"]), *state["history"][1:]]
            msgs += [
                ("user", f"Reviewer: {state['review']}"),
                ("user", "Write the fixed function."),
            ]
            code = extract_code(text(bound["fixer"].invoke(msgs)), item)
            _, result, _ = _test(item, code, "call_fixer")
            outcome = Outcome(
                task_id=item.task_id, passed=result.passed, status=result.status, stage="fixer"
            )
            return {"code": code, "results": [outcome]}

        g = StateGraph(SolveState)
        g.add_node("writer", writer)
        g.add_node("reviewer", reviewer)
        g.add_node("fixer", fixer)
        g.add_edge(START, "writer")
        g.add_conditional_edges("writer", route)
        g.add_edge("reviewer", "fixer")
        g.add_edge("fixer", END)
        return g.compile()

    def static_prompts(self, item: Sequence[CodeItem]) -> dict[str, list[Any]]:
        """Every agent's tool block and role prompt (one thread serves every problem of the
        fan-out, so no problem text is static)."""
        from kvshare.integrations.tools import tool_schemas, with_tools
        from langchain_core.messages import SystemMessage

        tools = tool_schemas([run_tests])
        return {a: with_tools([SystemMessage(PREAMBLE + ROLES[a])], tools) for a in self.agents}

    def inputs(self, item: Sequence[CodeItem]) -> dict[str, Any]:
        return {"problems": list(item), "results": []}

    def score(self, item: Any, state: Mapping[str, Any]) -> float:
        results = state.get("results", [])
        return sum(r["passed"] for r in results) / len(results) if results else 0.0

    def answer(self, state: Mapping[str, Any]) -> str:
        results = state.get("results", [])
        return ", ".join(f"{r['task_id']}: {r['status']} ({r['stage']})" for r in results)

    def describe(self, item: Sequence[CodeItem]) -> str:
        return ", ".join(i.task_id for i in item)
