"""What a call returns and records: ChatResult, CallStats from a prefill, memory usage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from kvshare.engine.correct import RunEstimate
from kvshare.engine.decode import DecodeResult
from kvshare.engine.relocate import Assembly
from kvshare.engine.request import Request
from kvshare.engine.stats import CallStats, MessageReuse
from kvshare.errors import NonFiniteError
from kvshare.kernels import KV
from kvshare.model.prompt import Prompt

FittedGain = tuple[str, torch.Tensor, torch.Tensor]
"""(context key, K gain, V gain): 0-dim device tensors fitted in a prefill, NaN when a run
had nothing to fit; read on the host only after the first token."""


class Prefilled(NamedTuple):
    """A call's prefill: KV [L, H, S, D], last logits [V], recomputed mask [S], its
    assembly, anchor estimates, the gains fitted on the way (not yet recorded), and how many
    candidates exceeded the deviation threshold at the last check layer (not yet read)."""

    kv: KV
    logits: torch.Tensor
    done: torch.Tensor
    asm: Assembly
    estimates: list[RunEstimate]
    gains: list[FittedGain]
    above: torch.Tensor | None = None  # 0-dim: candidates above the deviation threshold


@dataclass(frozen=True)
class ChatResult:
    """text: the reply (stop strings cut off); tokens: generated ids; stats: see CallStats."""

    text: str
    tokens: list[int]
    stats: CallStats


class MemoryUsage(NamedTuple):
    """Bytes an engine holds: radix prefix cache, segment (trace) store, anchor pools."""

    prefix_cache: int
    segments: int
    anchors: int

    @property
    def total(self) -> int:
        return self.prefix_cache + self.segments + self.anchors


def non_finite(what: str) -> NonFiniteError:
    """The error for ``what`` holding NaN or inf."""
    return NonFiniteError(
        f"{what} hold NaN or infinite values (model weights, dtype overflow?); nothing "
        f"from this call was stored"
    )


def check_finite(what: str, *tensors: torch.Tensor) -> None:
    """Raise NonFiniteError when any tensor holds NaN or inf (one reduction each)."""
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise non_finite(what)


def call_stats(
    mode: str,
    req: Request,
    pre: Prefilled,
    dec: DecodeResult,
    ttft: float,
    decode_s: float,
    fidelity: dict[str, Any],
    stages: dict[str, float] | None = None,
) -> CallStats:
    asm, done, n = pre.asm, pre.done, len(req.prompt)
    relocated = int((asm.relocated & ~done).sum())
    return CallStats(
        mode=mode,
        prompt_tokens=n,
        prefix_hit_tokens=asm.prefix,
        relocated_tokens=relocated,
        recomputed_tokens=int((asm.relocated & done).sum()),
        computed_tokens=n - asm.prefix - relocated,
        output_tokens=len(dec.tokens),
        ttft_s=ttft,
        decode_tok_s=(len(dec.tokens) - 1) / decode_s if decode_s > 0 else 0.0,
        finish_reason=dec.finish_reason,
        agent=req.agent,
        session=req.session,
        tenant=req.tenant,
        stages=stages,
        message_reuse=message_reuse(req.prompt, asm, done),
        relocated_runs=tuple((run.start, run.end) for run in asm.runs),
        **fidelity,
    )


def message_reuse(prompt: Prompt, asm: Assembly, done: torch.Tensor) -> tuple[MessageReuse, ...]:
    """Per message of ``prompt`` (tail last): prefix-hit, relocated-and-kept and relocated-
    but-recomputed tokens. done: [S] bool, the tokens the prefill computed. One host read
    (the cumulative counts at the message bounds), after the first token."""
    segs = (*prompt.segments, prompt.tail)
    kept, redone = asm.relocated & ~done, asm.relocated & done
    cum = torch.nn.functional.pad(torch.stack([kept, redone]).long().cumsum(1), (1, 0))
    bounds = torch.tensor([s.start for s in segs] + [len(prompt)], device=cum.device)
    k, r = cum[:, bounds].tolist()  # [2, len(segs) + 1] cumulative counts
    return tuple(
        MessageReuse(
            s.index,
            s.role,
            s.start,
            s.end,
            max(0, min(s.end, asm.prefix) - s.start),
            k[i + 1] - k[i],
            r[i + 1] - r[i],
        )  # fmt: skip
        for i, s in enumerate(segs)
    )
