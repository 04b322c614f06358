"""LangChain's ChatOpenAI against the server, in a LangGraph graph with parallel branches:
the same answers as ChatKVShare in process, each call under its node's agent."""

from __future__ import annotations

import operator
from typing import Annotated, Any, TypedDict

from kvshare.integrations.langchain import ChatKVShare
from langchain_core.messages import HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI
from langgraph.graph import END, START, StateGraph

from factories import DOC
from serving import served

ROLES = {"planner": "Plan the answer.", "critic": "Find a flaw.", "writer": "Write it up."}


class State(TypedDict):
    notes: Annotated[list[str], operator.add]


def graph(model_for: Any) -> Any:
    """planner, then critic and writer at once (parallel branches), then judge."""

    def node(name: str) -> Any:
        def run(state: State) -> dict[str, list[str]]:
            task = f"You are the {name}. {ROLES.get(name, 'Decide.')}"
            prompt = [SystemMessage("A team reads one document. Be brief."), HumanMessage(DOC),
                      HumanMessage("\n".join([task, *sorted(state["notes"])]))]  # fmt: skip
            return {"notes": [f"{name}: {model_for(name).invoke(prompt).content}"]}

        return run

    g = StateGraph(State)
    for name in ("planner", "critic", "writer", "judge"):
        g.add_node(name, node(name))
    g.add_edge(START, "planner")
    g.add_edge("planner", "critic")
    g.add_edge("planner", "writer")
    g.add_edge(["critic", "writer"], "judge")
    g.add_edge("judge", END)
    return g.compile()


def test_chat_openai_graph_equals_chat_kvshare_in_process(tiny_engine):
    local = ChatKVShare(engine=tiny_engine.fork(mode="prefix"), max_tokens=6)
    expected = graph(lambda name: local).invoke({"notes": []})
    with served(tiny_engine.fork(mode="prefix")) as server:

        def remote(name: str) -> ChatOpenAI:
            return ChatOpenAI(
                base_url=f"{server.base}/v1", api_key="unused", model=server.state.model_id,
                temperature=0, max_tokens=6, max_retries=0,
                default_headers={"X-KVShare-Agent": name, "X-KVShare-Session": "g1"},
            )  # fmt: skip

        got = graph(remote).invoke({"notes": []})
        calls = server.state.engine.calls
    assert sorted(got["notes"]) == sorted(expected["notes"]) and len(got["notes"]) == 4
    assert sorted(c.agent for c in calls) == ["critic", "judge", "planner", "writer"]
    assert {c.session for c in calls} == {"g1"}
    assert sum(c.prefix_hit_tokens for c in calls) > 0  # the branches reuse the shared DOC
