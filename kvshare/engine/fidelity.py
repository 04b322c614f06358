"""Shadow fidelity: a call compared with a full prefill of the same prompt (design.md §5),
and the recompute-ratio controller that the comparison steers."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from kvshare.engine.decode import SamplingParams, decode
from kvshare.engine.stats import GREEDY_CAP, greedy_match, kl_divergence
from kvshare.kernels import KV, partial_prefill


def full_prefill(model: nn.Module, ids: tuple[int, ...], empty: KV) -> tuple[KV, Tensor]:
    """Prefill every token of ``ids`` from scratch: (KV [L, H, S, D], last logits [V]).
    empty: a KV of zero tokens of the model's shape, dtype and device."""
    dev, n = empty.keys.device, len(ids)
    pos = torch.arange(n, device=dev)
    res = partial_prefill(model, empty.padded(n), torch.tensor(ids, device=dev), pos, pos)
    return res.kv, res.logits[-1]


def greedy(model: nn.Module, kv: KV, logits: Tensor, eos_ids: set[int], context: int) -> list:
    """Up to GREEDY_CAP greedy tokens after a prefill with last logits [V]."""
    return decode(
        model,
        kv,
        int(logits.argmax()),
        GREEDY_CAP,
        params=SamplingParams(),
        eos_ids=eos_ids,
        context_length=context,
    ).tokens


def compare(
    model: nn.Module,
    full: tuple[KV, Tensor],
    ours: tuple[KV, Tensor],
    tokens: list[int],
    greedy_done: bool,
    eos_ids: set[int],
    context: int,
) -> dict[str, Any]:
    """KL(full ‖ ours) of the first token, top-1 agreement and greedy match.

    tokens: what the call generated; ``greedy_done`` when they are already its greedy
    continuation to GREEDY_CAP or EOS (no second decode needed).
    """
    ref = greedy(model, *full, eos_ids, context)
    mine = tokens if greedy_done else greedy(model, *ours, eos_ids, context)
    return {
        "kl": kl_divergence(full[1], ours[1]),
        "top1_agree": bool(int(full[1].argmax()) == int(ours[1].argmax())),
        "greedy_match": greedy_match(ref, mine, eos_ids),
    }


def adapt_ratio(ratio: float, kl: float, target_kl: float, cap: float) -> float:
    """Move the recompute ratio toward ``target_kl``: up fast (x2 at most), down slowly.

    First-token KL is heavy-tailed, so a symmetric step would steer its geometric mean,
    not the mean we report, to the target; the slow way down keeps the mean in check.
    """
    return _bounded_step(ratio, (kl / target_kl) ** 0.5, cap)


def steer_ratio(ratio: float, above: float, cap: float) -> float:
    """A production call's step for the recompute ratio, with no reference to measure KL:
    toward ``above``, the share of relocated tokens whose deviation at the last check layer
    exceeded the threshold (what the threshold alone would recompute; the budget is the
    floor under it), by the steps of :func:`adapt_ratio` (x2 up, x0.85 down at most),
    within [0.01, cap]."""
    want = min(cap, max(0.01, above))
    return _bounded_step(ratio, (want / ratio) ** 0.5, cap)


def _bounded_step(ratio: float, step: float, cap: float) -> float:
    """``ratio * step`` with the step held to [0.85, 2] and the result to [0.01, cap]."""
    step = min(2.0, step) if step > 1 else max(0.85, step)
    return min(cap, max(0.01, ratio * step))
