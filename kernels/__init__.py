"""Tensor operations of the hot path (torch reference implementations).

Shape glossary: B batch, L layers, H kv heads, S tokens, D head dim, N selected, V vocabulary.
"""

from kvshare.kernels.growing import GrowingCache
from kvshare.kernels.kv import (
    KV,
    cache_kwargs,
    gather,
    output_cache,
    scatter,
    slice_tokens,
    splice,
)
from kvshare.kernels.layerwise import Narrow, gradual_prefill, layer_kv
from kvshare.kernels.prefill import PrefillResult, partial_prefill, position_mask
from kvshare.kernels.rope import shift_kv, shift_rope

__all__ = [
    "KV",
    "GrowingCache",
    "Narrow",
    "PrefillResult",
    "cache_kwargs",
    "gather",
    "gradual_prefill",
    "layer_kv",
    "output_cache",
    "partial_prefill",
    "position_mask",
    "scatter",
    "shift_kv",
    "shift_rope",
    "slice_tokens",
    "splice",
]
