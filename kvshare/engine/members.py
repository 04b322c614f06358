"""A call's place in the decode batch (``kvshare.engine.batcher``): :class:`Member` (its tokens,
its decode rules, where its tokens go) and :func:`fair_pick` (which waiting calls join next)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvshare.engine.decode import DecodeResult, SamplingParams, end_reason
from kvshare.errors import DecodeCapacityError
from kvshare.kernels import KV
from kvshare.model.batched import slot_tokens
from kvshare.model.shared_prefix import ShareKey

END = object()  # what a member emits after its last token


@dataclass(eq=False)  # compared by identity
class Member:
    """One call's decode, built by the caller with ``decode.decode``'s rules. tokens:
    generated so far (the prefill's first included). prompt: its KV [L, H, S, D] until a
    batch row holds it (then None: the row is the only copy)."""

    prompt: KV | None
    tokens: list[int]
    max_new_tokens: int
    params: SamplingParams
    eos_ids: set[int]
    context_length: int
    generator: torch.Generator | None = None
    should_stop: Callable[[list[int]], bool] | None = None
    tenant: str | None = None
    emit: Callable[[object], Any] = print  # set by the batcher: each token id, then END
    shared: ShareKey | None = None  # a prefix of ``prompt`` to hold once (shared_prefix)
    row: int | None = None
    reason: str = "length"
    result: DecodeResult | None = None
    error: BaseException | None = None
    cancelled: bool = False
    prompt_len: int = 0

    def __post_init__(self) -> None:
        assert self.prompt is not None
        self.prompt_len = self.prompt.length

    @property
    def shared_tokens(self) -> int:
        """Tokens of the shared prefix this call's row does not copy (0: none)."""
        return sum(p.length for p in self.shared[1]) if self.shared is not None else 0

    def ended(self) -> bool:
        """Apply ``decode.end_reason`` after the last token (handed to the caller unless
        it is EOS); True when done."""
        pos = self.prompt_len + len(self.tokens) - 1
        why = end_reason(self.tokens, self.eos_ids, self._hand_over, self.max_new_tokens, pos,
                         self.context_length)  # fmt: skip
        self.reason = why or self.reason
        return why is not None

    def _hand_over(self, tokens: list[int]) -> bool:
        self.emit(tokens[-1])
        return self.should_stop is not None and self.should_stop(tokens)


def fair_pick(pending: Sequence[Member], running: Sequence[Member], room: int) -> list[Member]:
    """Up to ``room`` waiting calls to admit: each time the oldest waiting call of the tenant
    with the fewest calls decoding (ties: the older call). No tenant starves behind another's
    burst, and within a tenant calls keep their arrival order."""
    load = Counter(m.tenant for m in running)
    waiting = list(pending)  # arrival order
    chosen: list[Member] = []
    while waiting and len(chosen) < room:
        i = min(range(len(waiting)), key=lambda j: (load[waiting[j].tenant], j))
        m = waiting.pop(i)
        load[m.tenant] += 1
        chosen.append(m)
    return chosen


def need_bytes(
    dims: tuple[int, int, int], prompt: int, max_new_tokens: int, context: int, dtype: Any
) -> int:
    """Decode-row bytes of a call of ``prompt`` tokens decoding up to ``max_new_tokens``
    (whole slot blocks; ``dims``: layers, kv heads, head dim)."""
    layers, heads, dim = dims
    tokens = slot_tokens(prompt + max(0, min(max_new_tokens, context - prompt) - 1))
    return int(tokens * 2 * layers * heads * dim * dtype.itemsize)


def check_fits(need: int, budget: int, prompt: int, max_new_tokens: int) -> None:
    """DecodeCapacityError when a call's decode rows (``need`` bytes) exceed the budget."""
    if need > budget:
        raise DecodeCapacityError(
            f"this call's decode KV ({prompt} prompt + {max_new_tokens} new tokens: "
            f"{need / 2**20:.1f} MiB) exceeds decode_pool_bytes "
            f"({budget / 2**20:.1f} MiB); lower max_new_tokens or raise it"
        )


def outcome(m: Member) -> DecodeResult:
    """A finished member's result, or its error raised."""
    if m.error is not None:
        raise m.error
    assert m.result is not None
    return m.result
