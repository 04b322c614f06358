"""A preallocated decode cache: new tokens are written in place, never concatenated."""

from __future__ import annotations

from typing import Any

import torch
from kvshare.kernels.kv import KV
from torch import Tensor


class GrowingCache:
    """The KV of a sequence being decoded, in a buffer [L, H, capacity, D] allocated once.

    Tokens ``[0, length)`` are valid. As the model's cache, ``update`` writes the new tokens'
    K/V of one layer at ``[length, length + n)`` and returns that layer's valid prefix plus
    them ([1, H, length + n, D] views); the caller calls ``advance(n)`` after the forward.
    A ``DynamicCache`` concatenates every layer at every token instead (quadratic copying
    over a reply). It answers transformers' mask builder (``get_query_offset``,
    ``get_mask_sizes``), so a one-token step needs no mask: SDPA then attends without one
    and with grouped-query attention native (no ``repeat_kv`` copy of the cache per layer).
    """

    is_compileable = False

    def __init__(self, prompt: KV, capacity: int) -> None:
        layers, heads, n, dim = prompt.keys.shape
        if capacity < n:
            raise ValueError(f"GrowingCache: capacity {capacity} < {n} prompt tokens")
        self.keys = prompt.keys.new_empty(layers, heads, capacity, dim)
        self.values = torch.empty_like(self.keys)
        self.keys[:, :, :n] = prompt.keys
        self.values[:, :, :n] = prompt.values
        self.length = n

    @property
    def capacity(self) -> int:
        return int(self.keys.shape[2])

    def update(
        self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        """key_states, value_states: [1, H, n, D] of the tokens being fed."""
        end = self.length + key_states.shape[2]
        if end > self.capacity:
            raise ValueError(f"GrowingCache: {end} tokens exceed capacity {self.capacity}")
        self.keys[layer_idx, :, self.length : end] = key_states[0]
        self.values[layer_idx, :, self.length : end] = value_states[0]
        return self.keys[layer_idx, :, :end][None], self.values[layer_idx, :, :end][None]

    def advance(self, n: int) -> None:
        self.length += n

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def get_query_offset(self, layer_idx: int = 0) -> int:
        """Position of the first token being fed (the mask builder's query offset)."""
        return self.length

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        """(kv_length, kv_offset) a mask over this cache spans while ``query_length`` tokens
        are fed."""
        return self.length + query_length, 0

    def kv(self) -> KV:
        """The valid tokens as KV [L, H, length, D]: the buffer itself when full, else a
        compact copy (a view would pin the whole buffer and under-report its bytes)."""
        if self.length == self.capacity:
            return KV(self.keys, self.values)
        end = self.length
        return KV(self.keys[:, :, :end].clone(), self.values[:, :, :end].clone())
