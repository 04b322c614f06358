"""RAG QA team: extractor -> verifier -> (re-check loop) -> answerer over shared passages.

Every agent reads the same retrieved passages (the gold NarrativeQA passage among
distractors) behind its own role prompt, so the passages sit at a different position for
each agent: exact prefix reuse cannot reach them, relocation can. The verifier sends the
extractor back at most ``max_checks`` times; the answerer sees the evidence only when the
verifier accepted it (a 135M model otherwise answers from rejected evidence). Scored by word
F1 of the answer against the best gold answer (``kvshare.bench.workloads.token_f1``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypedDict

from kvshare.agents.teams.base import Models, Team, text

from kvshare.bench.corpus import NARRATIVEQA_TINY, QAItem, qa_items
from kvshare.bench.workloads import token_f1
from kvshare.errors import ConfigError

PREAMBLE = (
    "You are one agent of a question-answering team. The team reads the retrieved passages "
    "and answers the user's question from them only.\n"
)
ROLES = {
    "extractor": "You are the extractor. Quote the sentences of the passages that answer the "
    "question, word for word.",
    "verifier": "You are the verifier. Decide whether the quoted evidence answers the "
    "question. Start your reply with yes or no.",
    "answerer": "You are the answerer. Answer the question in a few words.",
}


class RagState(TypedDict, total=False):
    question: str
    passages: list[str]
    evidence: str
    verdict: str
    answer: str
    checks: int


@dataclass(frozen=True)
class RagItem:
    """A question, the passages retrieved for it (gold among distractors), gold answers."""

    question: str
    passages: tuple[str, ...]
    answers: tuple[str, ...]


def _context(state: Mapping[str, Any]) -> str:
    blocks = [f"[{i + 1}] {p}" for i, p in enumerate(state["passages"])]
    return "Passages:\n\n" + "\n\n".join(blocks) + f"\n\nQuestion: {state['question']}"


def _messages(agent: str, state: Mapping[str, Any], *extra: str) -> list[tuple[str, str]]:
    msgs = [("system", PREAMBLE + ROLES[agent]), ("user", _context(state))]
    return msgs + [("user", e) for e in extra]


def _supported(state: Mapping[str, Any]) -> bool:
    """The verifier accepted the evidence (its reply starts with yes)."""
    return str(state.get("verdict", "")).lower().lstrip(" *\"'").startswith("yes")


@dataclass(frozen=True)
class RagTeam(Team):
    """``n_passages`` passages per question; at most ``max_checks`` re-checks."""

    n_passages: int = 2
    max_checks: int = 1
    name: ClassVar[str] = "rag"
    title: ClassVar[str] = "RAG QA over NarrativeQA passages"
    agents: ClassVar[tuple[str, ...]] = ("extractor", "verifier", "answerer")
    max_tokens: ClassVar[Mapping[str, int]] = {"extractor": 48, "verifier": 8, "answerer": 16}
    default_items: ClassVar[int] = 3
    score_name: ClassVar[str] = "word F1"

    def __post_init__(self) -> None:
        if self.n_passages < 1 or self.max_checks < 0:
            raise ConfigError("RagTeam needs n_passages >= 1 and max_checks >= 0")

    def items(self, n: int, offset: int = 0) -> Sequence[RagItem]:
        """Questions ``offset..offset+n-1``; the distractors are the next distinct passages of
        the file, and the gold passage's slot rotates with the item index."""
        rows = qa_items(NARRATIVEQA_TINY)
        if n < 1 or offset < 0 or offset + n > len(rows):
            raise ConfigError(f"asked for items [{offset}, {offset + n}) of {len(rows)}")
        return [self._item(rows, k) for k in range(offset, offset + n)]

    def _item(self, rows: Sequence[QAItem], k: int) -> RagItem:
        gold = rows[k]
        others = dict.fromkeys(r.context for r in [*rows[k + 1 :], *rows[:k]])
        others.pop(gold.context, None)
        passages = list(others)[: self.n_passages - 1]
        passages.insert(k % self.n_passages, gold.context)
        return RagItem(gold.question, tuple(passages), gold.answers)

    def build(self, models: Models) -> Any:
        from langgraph.graph import END, START, StateGraph

        def extractor(state: RagState) -> RagState:
            extra = ["Quote the evidence."]
            if state.get("evidence"):  # a re-check: the verifier rejected this evidence
                extra += [f"Earlier evidence: {state['evidence']}", "Quote other sentences."]
            reply = models["extractor"].invoke(_messages("extractor", state, *extra))
            return {"evidence": text(reply), "checks": state.get("checks", -1) + 1}

        def verifier(state: RagState) -> RagState:
            ask = f"Evidence: {state['evidence']}\n\nDoes it answer the question? Yes or no."
            return {"verdict": text(models["verifier"].invoke(_messages("verifier", state, ask)))}

        def route(state: RagState) -> Literal["answerer", "extractor"]:
            done = _supported(state) or state["checks"] >= self.max_checks
            return "answerer" if done else "extractor"

        def answerer(state: RagState) -> RagState:
            evidence = [f"Evidence: {state['evidence']}"] if _supported(state) else []
            msgs = _messages("answerer", state, *evidence, "Answer the question in a few words.")
            return {"answer": text(models["answerer"].invoke(msgs))}

        g = StateGraph(RagState)
        g.add_node("extractor", extractor)
        g.add_node("verifier", verifier)
        g.add_node("answerer", answerer)
        g.add_edge(START, "extractor")
        g.add_edge("extractor", "verifier")
        g.add_conditional_edges("verifier", route)
        g.add_edge("answerer", END)
        return g.compile()

    def static_prompts(self, item: RagItem) -> dict[str, list[Any]]:
        """Every agent's role prompt and the passages with the question."""
        state = self.inputs(item)
        return {a: _messages(a, state) for a in self.agents}

    def inputs(self, item: RagItem) -> dict[str, Any]:
        return {"question": item.question, "passages": list(item.passages)}

    def score(self, item: RagItem, state: Mapping[str, Any]) -> float:
        return max(token_f1(state.get("answer", ""), gold) for gold in item.answers)

    def answer(self, state: Mapping[str, Any]) -> str:
        return str(state.get("answer", ""))
