"""KV tensors of one token sequence and the slice operations of the hot path.

Shape glossary (used in every tensor docstring): B batch, L layers, H kv heads, S tokens,
D head dim, N selected tokens, V vocabulary.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache


@cache
def _cache_name(forward: Any) -> str:
    params = inspect.signature(forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(module: Any, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` for ``module``'s forward: ``cache`` in transformers >= 5.2x (where
    ``past_key_values`` is deprecated), ``past_key_values`` before."""
    return {_cache_name(type(module).forward): cache}


def output_cache(out: Any) -> Any:
    """The cache a model forward returned (``cache``, formerly ``past_key_values``)."""
    found = getattr(out, "cache", None)
    return found if found is not None else out.past_key_values


@dataclass(frozen=True)
class KV:
    """Keys and values of S tokens for every layer. Shape: ``keys``/``values`` [L, H, S, D].

    Keys are stored *after* RoPE at the positions they were computed for; values carry no
    position. Instances are treated as immutable: operations return new tensors.
    """

    keys: Tensor
    values: Tensor

    def __post_init__(self) -> None:
        if self.keys.shape != self.values.shape or self.keys.dim() != 4:
            raise ValueError(
                f"keys/values must both be [L, H, S, D]; got {tuple(self.keys.shape)} "
                f"and {tuple(self.values.shape)}"
            )

    @property
    def length(self) -> int:
        """S, the number of tokens."""
        return int(self.keys.shape[2])

    @property
    def nbytes(self) -> int:
        return int(self.keys.nbytes + self.values.nbytes)

    @staticmethod
    def empty(
        like: KV | None = None,
        *,
        shape: tuple[int, int, int] | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> KV:
        """A KV of zero tokens, shaped like ``like`` or given ``shape`` = (L, H, D)."""
        if like is not None:
            n_layers, heads, _, dim = like.keys.shape
            dtype, device = like.keys.dtype, like.keys.device
        elif shape is not None:
            n_layers, heads, dim = shape
        else:
            raise ValueError("KV.empty needs `like` or `shape`")
        z = torch.empty(n_layers, heads, 0, dim, dtype=dtype, device=device)
        return KV(z, z.clone())

    def padded(self, n: int) -> KV:
        """This KV followed by zeros up to n tokens: [L, H, n, D]."""
        if n < self.length:
            raise ValueError(f"padded: {n} < {self.length} tokens")
        layers, heads, _, dim = self.keys.shape
        z = self.keys.new_zeros(layers, heads, n - self.length, dim)
        return KV(torch.cat([self.keys, z], 2), torch.cat([self.values, z], 2))

    def to_cache(self) -> DynamicCache:
        """A transformers ``DynamicCache`` holding this KV (batch 1, full-attention layers)."""
        cache = DynamicCache()
        for layer in range(self.keys.shape[0]):
            cache.update(self.keys[layer][None], self.values[layer][None], layer)
        return cache

    @staticmethod
    def from_cache(cache: DynamicCache, start: int = 0) -> KV:
        """Tokens ``[start, S)`` of a batch-1 ``DynamicCache`` as a KV [L, H, S - start, D]."""
        layers: list[Any] = list(cache.layers)
        keys = torch.stack([layer.keys[0, :, start:] for layer in layers])
        values = torch.stack([layer.values[0, :, start:] for layer in layers])
        return KV(keys, values)


def to_device(mask: Any, like: Tensor) -> Tensor:
    """A host array (numpy) on ``like``'s device: from pinned memory, without a host sync,
    on CUDA."""
    t = torch.from_numpy(mask)
    if like.device.type == "cuda":
        t = t.pin_memory()
    return t.to(like.device, non_blocking=True)


def gather(kv: KV, index: Tensor) -> KV:
    """Select tokens. index: [N] long. Returns KV [L, H, N, D]."""
    return KV(kv.keys.index_select(2, index), kv.values.index_select(2, index))


def scatter(kv: KV, index: Tensor, src: KV) -> KV:
    """Write ``src`` [L, H, N, D] into the token slots ``index`` [N] of ``kv`` [L, H, S, D].

    Returns a new KV; ``kv`` is not modified.
    """
    if src.length != index.numel():
        raise ValueError(f"scatter: {index.numel()} slots but {src.length} source tokens")
    return KV(kv.keys.index_copy(2, index, src.keys), kv.values.index_copy(2, index, src.values))


def splice(parts: list[KV]) -> KV:
    """Concatenate KV slices along the token axis: [L, H, S1, D] + [L, H, S2, D] + ..."""
    if not parts:
        raise ValueError("splice needs at least one part")
    if len(parts) == 1:
        return parts[0]
    return KV(torch.cat([p.keys for p in parts], 2), torch.cat([p.values for p in parts], 2))


def slice_tokens(kv: KV, start: int, end: int) -> KV:
    """Tokens ``[start, end)``: KV [L, H, end - start, D] (views, no copy)."""
    return KV(kv.keys[:, :, start:end], kv.values[:, :, start:end])
