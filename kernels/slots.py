"""A transformers-compatible cache that writes recomputed tokens into their own slots."""

from __future__ import annotations

from typing import Any

import torch
from kvshare.kernels.kv import KV
from torch import Tensor


class SlotCache:
    """The KV [L, H, S, D] of a whole sequence as the model's ``past_key_values``.

    ``update`` writes the fresh KV of the tokens being computed (batch 1, [1, H, N, D]) into
    their slots ``slots`` [N] of layer ``layer_idx`` *in place* and returns that whole layer
    ([1, H, S, D]); attention then sees every token exactly once — fresh KV for the computed
    tokens, cached KV for the rest — so the caller's mask must be over all S slots by true
    positions. Compared with a ``DynamicCache`` holding the unselected tokens, this saves a
    gather of the past, a concatenation per layer and a scatter of the result (three copies
    of the cache per call). Only layers the forward runs through are written. With ``live``
    set, only the live slots take their fresh KV (fixed shapes: a narrowed set carried on at
    full size; ``kernels.gradual_prefill``).
    """

    is_compileable = False

    def __init__(self, kv: KV, slots: Tensor):
        self.kv = kv
        self.slots = slots
        self.live: Tensor | None = None  # [N] bool over ``slots``: None, every one writes

    def only_live(self, layer: int, fresh: KV) -> KV:
        """``fresh`` [1, H, N, D] of ``slots`` where ``live``, the cached KV elsewhere (carried
        tokens that no longer write keep what is there); ``fresh`` itself without ``live``."""
        if self.live is None:
            return fresh
        live = self.live[None, None, :, None]
        old = KV(
            self.kv.keys[layer][None, :, self.slots], self.kv.values[layer][None, :, self.slots]
        )
        return KV(
            torch.where(live, fresh.keys, old.keys), torch.where(live, fresh.values, old.values)
        )

    def write(self, layer: int, slots: Tensor, fresh: KV) -> None:
        """Write ``fresh`` [1, H, N, D] into ``slots`` [N] of ``layer``, in place."""
        keys, values = self.kv.keys[layer], self.kv.values[layer]
        keys.index_copy_(1, slots, fresh.keys[0].to(keys.dtype))
        values.index_copy_(1, slots, fresh.values[0].to(values.dtype))

    def update(
        self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        self.write(layer_idx, self.slots, self.only_live(layer_idx, KV(key_states, value_states)))
        return self.kv.keys[layer_idx][None], self.kv.values[layer_idx][None]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.kv.length
