"""Benchmark workloads: multi-agent workflows that produce each agent's messages in order."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kvshare.errors import ConfigError

Messages = list[dict[str, str]]


class Workload(ABC):
    """A workflow of ``n_agents`` calls; agent i's messages may use the outputs of agents < i.

    Contract: ``messages`` is deterministic in (i, outputs) and ``outputs`` holds exactly the
    texts of agents 0..i-1.
    """

    name: str
    n_agents: int
    max_new_tokens: int

    @abstractmethod
    def messages(self, i: int, outputs: Sequence[str]) -> Messages: ...

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
    each; it answers with up to ``output_len`` tokens.
    """

    tokenizer: Any
    corpus: str
    n_agents: int = 5
    prefix_len: int = 256
    input_len: int = 512
    output_len: int = 64
    name: str = "synthetic"

    def __post_init__(self) -> None:
        for field_name in ("n_agents", "prefix_len", "input_len", "output_len"):
            if getattr(self, field_name) < 1:
                raise ConfigError(f"{field_name} must be >= 1")
        self.max_new_tokens = self.output_len
        self.shared_input = take_tokens(self.tokenizer, self.corpus, self.input_len)
        self.prefixes = [self._prefix(i) for i in range(self.n_agents)]

    def _prefix(self, i: int) -> str:
        role = ROLES[i % len(ROLES)]
        head = f"You are agent {i}, the team's {role}. Background notes for your role:\n"
        n_head = len(self.tokenizer(head, add_special_tokens=False)["input_ids"])
        body_len = max(1, self.prefix_len - n_head)
        offset = self.input_len + i * body_len  # every agent reads different real text
        return head + take_tokens(self.tokenizer, self.corpus, body_len, offset)

    def messages(self, i: int, outputs: Sequence[str]) -> Messages:
        msgs = [
            {"role": "system", "content": self.prefixes[i]},
            {"role": "user", "content": self.shared_input},
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
        }
