"""The branches workload as a LangGraph graph: a reader reads the document, then a ``Send``
fan-out runs N answerers over it (each the document and its own question through
``ChatKVShare``), at once (``max_concurrency=N``) and one at a time, in ``prefix`` mode.
Per N: wall both ways, whether the answers are equal, and the shared prefixes' bytes held
while the branches decode (the decode rows' peak, ``kvshare.model.batched.DecodeSlots``)."""

from __future__ import annotations

import operator
import threading
import time
from typing import Annotated, Any, TypedDict

from pydantic import BaseModel

from kvshare.engine.engine import Engine


class GraphRow(BaseModel):
    """One branch count: ``wall_s`` at once and one at a time, same answers, peak bytes of
    shared prefixes held and of the decode rows (at once)."""

    branches: int
    wall_s: float
    serial_wall_s: float
    same_answers: bool
    held_mib: float
    rows_mib: float


class _State(TypedDict, total=False):
    questions: list[str]
    question: str
    answers: Annotated[list[tuple[str, str]], operator.add]


def _graph(engine: Engine, doc: str) -> Any:
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
    from langgraph.graph import END, START, StateGraph
    from langgraph.types import Send

    from kvshare.integrations.langchain import ChatKVShare
    from kvshare.integrations.langgraph import wrap

    system = SystemMessage("You answer questions about the document.")
    reader = ChatKVShare(engine=engine, agent="reader", max_tokens=1)
    answerer = ChatKVShare(engine=engine, agent="answerer", max_tokens=32)

    def read(state: _State) -> dict[str, Any]:
        reader.invoke([system, HumanMessage(doc)])
        return {}

    def fan_out(state: _State) -> list[Any]:
        return [Send("answer", {"question": q}) for q in state["questions"]]

    def answer(state: _State) -> dict[str, Any]:
        reply = answerer.invoke([system, HumanMessage(doc), AIMessage("I have read it."),
                                 HumanMessage(state["question"])])  # fmt: skip
        return {"answers": [(state["question"], str(reply.content))]}

    g = StateGraph(_State)
    g.add_node("read", read)
    g.add_node("answer", answer)
    g.add_edge(START, "read")
    g.add_conditional_edges("read", fan_out, ["answer"])
    g.add_edge("answer", END)
    return wrap(g.compile(), engine)


def run_graph(base: Engine, doc: str, questions: list[str], at_once: int) -> tuple:
    """(answers by question, wall s, peak shared-prefix bytes, peak row bytes)."""
    eng = base.fork(mode="prefix")
    graph = _graph(eng, doc)
    peak = [0, 0]
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.005):
            slots = eng.batcher.slots if eng.batcher is not None else None
            if slots is not None:
                peak[0] = max(peak[0], slots.held_bytes)
                peak[1] = max(peak[1], slots.nbytes)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    config = {"configurable": {"thread_id": f"branches-{at_once}"}, "max_concurrency": at_once}
    state = graph.invoke({"questions": questions, "answers": []}, config)
    wall = time.perf_counter() - t0
    done.set()
    watcher.join()
    return dict(state["answers"]), wall, peak[0], peak[1]


def measure_graph(base: Engine, doc: str, questions: list[str]) -> GraphRow:
    """One row: the fan-out over ``questions`` at once against one at a time."""
    together, wall, held, rows = run_graph(base, doc, questions, len(questions))
    alone, serial_wall, _, _ = run_graph(base, doc, questions, 1)
    return GraphRow(branches=len(questions), wall_s=wall, serial_wall_s=serial_wall,
                    same_answers=together == alone, held_mib=held / 2**20,
                    rows_mib=rows / 2**20)  # fmt: skip


def markdown_graph(rows: list[GraphRow]) -> str:
    lines = [
        "| branches (LangGraph Send) | wall at once / one at a time (s) | × | shared prefixes "
        "held at peak (MiB) | decode rows at peak (MiB) | same answers |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.branches} | {r.wall_s:.2f} / {r.serial_wall_s:.2f} | "
            f"{r.wall_s / r.serial_wall_s:.2f}× | {r.held_mib:.1f} | {r.rows_mib:.1f} | "
            f"{'yes' if r.same_answers else 'no'} |"
        )
    return "\n".join(lines) + "\n"
