"""Token sampling and the decode loop (one token per forward, KV kept in a DynamicCache)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from kvshare.kernels import KV, GrowingCache, cache_kwargs


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy, and so is any temperature below float32's smallest normal
    number (``GREEDY_BELOW``: logits / t would be 0 / 0 at the top token); top_p in (0, 1]
    keeps the smallest nucleus reaching p."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


GREEDY_BELOW = torch.finfo(torch.float32).tiny  # 1.2e-38: sampling is in float32


def next_token(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> Tensor:
    """Next token from logits [V] as a 0-dim long tensor on the logits' device: no host read.

    Greedy is an argmax. A draw is an exponential race (``argmax p_i / E_i`` with ``E_i ~
    Exp(1)`` picks ``i`` with probability ``p_i``): a seeded one draws ``E`` with the call's
    generator on its own device (the CPU) and copies it over without blocking, so one seed
    gives the same tokens whatever device the logits are on. Top-p keeps fixed shapes (a mask
    over the sorted probabilities, no boolean indexing)."""
    if params.temperature < GREEDY_BELOW:
        return logits.argmax()
    scaled = logits.float() - logits.float().max()  # <= 0, so a tiny temperature gives -inf,
    probs = torch.softmax(scaled / params.temperature, dim=-1)  # never inf - inf = nan
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < params.top_p
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p * keep)
    gen_device = generator.device if generator is not None else probs.device
    race = torch.empty(probs.shape, device=gen_device).exponential_(generator=generator)
    if race.device != probs.device:
        race = (race.pin_memory() if probs.device.type == "cuda" else race).to(
            probs.device, non_blocking=True
        )
    return (probs / race).argmax()


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Next token from logits [V] (:func:`next_token`). Host sync boundary: one read, the
    token."""
    return int(next_token(logits, params, generator))


def end_reason(
    tokens: list[int],
    eos_ids: set[int],
    should_stop: Callable[[list[int]], bool] | None,
    max_new_tokens: int,
    pos: int,
    context_length: int,
) -> str | None:
    """Why a reply ends after its last token (None: it goes on), checked in this order:
    ``stop`` (EOS, or ``should_stop``, which sees every token but EOS), ``length``
    (``max_new_tokens`` generated), ``context`` (the next position ``pos`` is past it)."""
    if tokens[-1] in eos_ids or (should_stop is not None and should_stop(tokens)):
        return "stop"
    if len(tokens) >= max_new_tokens:
        return "length"
    return "context" if pos >= context_length else None


@dataclass(frozen=True)
class DecodeResult:
    """tokens: every generated token (the first one included).
    kv: KV [L, H, S + len(tokens) - 1, D]: the prompt plus every generated token but the last.
    finish_reason: ``stop`` (EOS or stop string), ``length`` (max_new_tokens) or ``context``.
    """

    tokens: list[int]
    kv: KV
    finish_reason: str


@torch.inference_mode()
def decode(
    model: nn.Module,
    prompt_kv: KV,
    first: int,
    max_new_tokens: int,
    *,
    params: SamplingParams,
    eos_ids: set[int],
    context_length: int,
    generator: torch.Generator | None = None,
    should_stop: Callable[[list[int]], bool] | None = None,
    pass_turn: Callable[[], None] | None = None,
    turn_tokens: int = 16,
) -> DecodeResult:
    """Generate after a prefill whose next token ``first`` was already sampled.

    prompt_kv: KV [L, H, S, D] of the prompt at positions 0..S-1.
    pass_turn: called after every ``turn_tokens`` generated tokens (the engine lets waiting
    calls run there; this call's KV is its own, so nothing it reads can change).
    """
    pos = prompt_kv.length
    cache = GrowingCache(prompt_kv, pos + max(0, min(max_new_tokens, context_length - pos) - 1))
    device = prompt_kv.keys.device
    tokens = [first]
    ends = (eos_ids, should_stop, max_new_tokens)
    while (reason := end_reason(tokens, *ends, pos, context_length)) is None:
        out = model(
            input_ids=torch.tensor([[tokens[-1]]], device=device),
            position_ids=torch.tensor([[pos]], device=device),
            attention_mask=None,  # one token sees the whole cache: no mask (GrowingCache)
            use_cache=True,
            **cache_kwargs(model, cache),
        )
        cache.advance(1)
        pos += 1
        tokens.append(sample(out.logits[0, -1], params, generator))
        if pass_turn is not None and len(tokens) % turn_tokens == 0:
            pass_turn()
    return DecodeResult(tokens, cache.kv(), reason)


def stop_checker(tokenizer: Any, stop: Sequence[str]) -> Callable[[list[int]], bool] | None:
    """A ``should_stop`` for ``decode`` that watches the decoded tail for any stop string."""
    if not stop:
        return None
    longest = max(len(s) for s in stop)

    def should_stop(tokens: list[int]) -> bool:
        tail = tokenizer.decode(tokens[-(longest + 8) :], skip_special_tokens=True)
        return any(s in tail for s in stop)

    return should_stop


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the first stop string it contains."""
    cuts = [text.find(s) for s in stop if s in text]
    return text[: min(cuts)] if cuts else text
