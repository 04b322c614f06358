"""Per-call statistics and fidelity metrics (definitions: design.md section 5)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

GREEDY_CAP = 32


@dataclass(frozen=True)
class CallStats:
    """What one ``Engine.chat`` call did.

    Token counts partition the prompt: prefix_hit + relocated + computed = prompt_tokens;
    recomputed_tokens counts tokens recomputed *because* reused KV was not trusted (they are
    part of computed_tokens). reuse_rate = 1 - computed_tokens / prompt_tokens.
    ttft_s counts everything on the call's critical path up to the first generated token.
    Fidelity fields (kl, top1_agree, greedy_match) are filled only with ``shadow=True``.
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
    """Aggregate over calls. reuse_rate is token-weighted; medians over calls."""

    calls: int
    prompt_tokens: int
    computed_tokens: int
    reuse_rate: float
    call_reuse_rate: float
    median_ttft_s: float
    mean_kl: float | None
    top1_agree_rate: float | None
    median_greedy_match: float | None


def _mean(xs: Sequence[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def aggregate(calls: Sequence[CallStats]) -> SessionStats:
    """Summarise ``calls`` (an empty list gives zeros and Nones)."""
    prompt = sum(c.prompt_tokens for c in calls)
    computed = sum(c.computed_tokens for c in calls)
    shadowed = [c for c in calls if c.kl is not None]
    return SessionStats(
        calls=len(calls),
        prompt_tokens=prompt,
        computed_tokens=computed,
        reuse_rate=1.0 - computed / prompt if prompt else 0.0,
        call_reuse_rate=sum(c.call_reused for c in calls) / len(calls) if calls else 0.0,
        median_ttft_s=statistics.median([c.ttft_s for c in calls]) if calls else 0.0,
        mean_kl=_mean([float(c.kl) for c in shadowed if c.kl is not None]),
        top1_agree_rate=_mean([float(bool(c.top1_agree)) for c in shadowed]),
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
    if a == b:
        return GREEDY_CAP
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
