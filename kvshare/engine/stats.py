"""Per-call statistics and fidelity metrics (definitions: design.md section 5)."""

from __future__ import annotations

import statistics
import threading
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
from torch import Tensor

from kvshare.model.prompt import common_prefix

GREEDY_CAP = 32


class MessageReuse(NamedTuple):
    """How the tokens ``[start, end)`` of one message of a call's prompt were served.

    message: the message's index in the call's list (``-1``: the generation-prompt tail,
    role ``generation``); role: its standard role. As in :class:`CallStats`, prefix_hit +
    relocated + computed = end - start, and recomputed (relocated tokens recomputed after
    all) is part of computed. Summed over a call's messages they give the call's counts.
    """

    message: int
    role: str
    start: int
    end: int
    prefix_hit: int
    relocated: int
    recomputed: int

    @property
    def tokens(self) -> int:
        return self.end - self.start

    @property
    def computed(self) -> int:
        return self.tokens - self.prefix_hit - self.relocated

    @property
    def reuse_rate(self) -> float:
        return 1.0 - self.computed / self.tokens if self.tokens else 0.0


@dataclass(frozen=True)
class CallStats:
    """What one ``Engine.chat`` call did.

    Token counts partition the prompt: prefix_hit + relocated + computed = prompt_tokens;
    recomputed_tokens counts tokens recomputed *because* reused KV was not trusted (they are
    part of computed_tokens). reuse_rate = 1 - computed_tokens / prompt_tokens.
    ttft_s counts everything on the call's critical path up to the first generated token.
    Fidelity fields (kl, top1_agree, greedy_match) are filled only with ``shadow=True``;
    ``stages`` (seconds per pipeline stage, ``kvshare.engine.profile``) only with
    ``EngineConfig(profile=True)``. ``message_reuse``: the same counts per message
    (:class:`MessageReuse`, in prompt order, the generation tail last); ``relocated_runs``:
    the prompt spans ``[start, end)`` that relocated runs filled (tokens of them may have
    been recomputed after all).
    """

    mode: str
    prompt_tokens: int
    prefix_hit_tokens: int
    relocated_tokens: int
    recomputed_tokens: int
    computed_tokens: int
    output_tokens: int
    ttft_s: float
    decode_tok_s: float
    finish_reason: str
    agent: str | None = None
    session: str | None = None
    tenant: str | None = None
    kl: float | None = None
    top1_agree: bool | None = None
    greedy_match: int | None = None
    stages: dict[str, float] | None = None
    message_reuse: tuple[MessageReuse, ...] = ()
    relocated_runs: tuple[tuple[int, int], ...] = ()

    @property
    def reuse_rate(self) -> float:
        return 1.0 - self.computed_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def call_reused(self) -> bool:
        """KVCOMM's call-level reuse: the call skipped a dense prefill of its prompt."""
        return self.computed_tokens < self.prompt_tokens

    def as_dict(self) -> dict[str, object]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["reuse_rate"] = self.reuse_rate
        d["call_reused"] = self.call_reused
        return d


@dataclass(frozen=True)
class SessionStats:
    """Aggregate over calls. reuse_rate is token-weighted; mean KL and top-1 over shadowed
    calls; medians over the calls an engine still keeps (``EngineConfig.call_log_size``)."""

    calls: int
    prompt_tokens: int
    computed_tokens: int
    reuse_rate: float
    call_reuse_rate: float
    median_ttft_s: float
    mean_kl: float | None
    top1_agree_rate: float | None
    median_greedy_match: float | None
    hints: int = 0  # workflow hints given for these calls' session (``Engine.hint``)


def aggregate(calls: Sequence[CallStats]) -> SessionStats:
    """Summarise ``calls`` (an empty list gives zeros and Nones)."""
    totals = _Totals()
    for c in calls:
        totals.add(c)
    return _summary(totals, calls)


@dataclass
class _Totals:
    """Exact running sums over calls (what SessionStats needs besides its medians)."""

    calls: int = 0
    prompt: int = 0
    computed: int = 0
    reused_calls: int = 0
    shadowed: int = 0
    kl_sum: float = 0.0
    top1: int = 0

    def add(self, c: CallStats) -> None:
        self.calls += 1
        self.prompt += c.prompt_tokens
        self.computed += c.computed_tokens
        self.reused_calls += int(c.call_reused)
        if c.kl is not None:
            self.shadowed += 1
            self.kl_sum += c.kl
            self.top1 += int(bool(c.top1_agree))

    def merge(self, other: _Totals) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


class CallLedger:
    """Bounded record of calls: the last ``window`` CallStats, plus exact totals per
    (session, agent) for the ``max_groups`` most recently active pairs and overall.

    Memory is bounded however many calls run; totals (calls, tokens, reuse, mean KL, top-1)
    are exact, medians (TTFT, greedy match) are over the kept window. Thread-safe.
    """

    def __init__(self, window: int, max_groups: int = 10_000) -> None:
        self._recent: deque[CallStats] = deque(maxlen=window)
        self._groups: OrderedDict[tuple[str | None, str | None], _Totals] = OrderedDict()
        self._all = _Totals()
        self._max_groups = max_groups
        self._lock = threading.Lock()

    def add(self, c: CallStats) -> None:
        with self._lock:
            self._recent.append(c)
            self._all.add(c)
            key = (c.session, c.agent)
            self._groups.setdefault(key, _Totals()).add(c)
            self._groups.move_to_end(key)
            while len(self._groups) > self._max_groups:
                self._groups.popitem(last=False)

    @property
    def recent(self) -> list[CallStats]:
        with self._lock:
            return list(self._recent)

    def stats(self, session: str | None = None, agent: str | None = None) -> SessionStats:
        """Aggregate over every call, or those of ``session`` and/or ``agent``."""
        with self._lock:
            if session is None and agent is None:
                totals = self._all
            else:
                totals = _Totals()
                for (s, a), t in self._groups.items():
                    if (session is None or s == session) and (agent is None or a == agent):
                        totals.merge(t)
            window = [
                c
                for c in self._recent
                if (session is None or c.session == session) and (agent is None or c.agent == agent)
            ]
        return _summary(totals, window)

    def clear(self) -> None:
        with self._lock:
            self._recent.clear()
            self._groups.clear()
            self._all = _Totals()


def _summary(t: _Totals, window: Sequence[CallStats]) -> SessionStats:
    shadowed = [c for c in window if c.kl is not None]
    return SessionStats(
        calls=t.calls,
        prompt_tokens=t.prompt,
        computed_tokens=t.computed,
        reuse_rate=1.0 - t.computed / t.prompt if t.prompt else 0.0,
        call_reuse_rate=t.reused_calls / t.calls if t.calls else 0.0,
        median_ttft_s=statistics.median([c.ttft_s for c in window]) if window else 0.0,
        mean_kl=t.kl_sum / t.shadowed if t.shadowed else None,
        top1_agree_rate=t.top1 / t.shadowed if t.shadowed else None,
        median_greedy_match=(
            statistics.median([c.greedy_match or 0 for c in shadowed]) if shadowed else None
        ),
    )


def kl_divergence(ref_logits: Tensor, logits: Tensor) -> float:
    """KL(ref || other) of two next-token distributions. Both [V]."""
    log_p = torch.log_softmax(ref_logits.float(), -1)
    log_q = torch.log_softmax(logits.float(), -1)
    return float((log_p.exp() * (log_p - log_q)).sum().clamp_min(0.0))


def greedy_match(ref: Sequence[int], other: Sequence[int], eos_ids: set[int]) -> int:
    """Tokens generated identically before the first divergence, capped at GREEDY_CAP.

    Sequences end at their first EOS (inclusive); two identical sequences score the cap.
    """

    def cut(seq: Sequence[int]) -> list[int]:
        out: list[int] = []
        for t in seq[:GREEDY_CAP]:
            out.append(t)
            if t in eos_ids:
                break
        return out

    a, b = cut(ref), cut(other)
    return GREEDY_CAP if a == b else common_prefix(a, b)
