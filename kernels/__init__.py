"""Tensor operations of the hot path: torch reference implementations, and the kernels
registry (``kernels_for``) that picks torch or Triton versions of the fused ops.

Shape glossary: B batch, L layers, H kv heads, S tokens, D head dim, N selected, V vocabulary.
"""

from kvshare.kernels.backends import KERNELS, kernels_for
from kvshare.kernels.growing import GrowingCache
from kvshare.kernels.kv import (
    KV,
    cache_kwargs,
    gather,
    output_cache,
    scatter,
    slice_tokens,
    splice,
    to_device,
)
from kvshare.kernels.layerwise import Narrow, gradual_prefill, layer_kv
from kvshare.kernels.ops import KernelOps, Move
from kvshare.kernels.prefill import PrefillResult, partial_prefill, position_mask
from kvshare.kernels.rope import shift_kv, shift_rope
from kvshare.kernels.torch_ops import TorchOps

__all__ = [
    "KERNELS",
    "KernelOps",
    "Move",
    "TorchOps",
    "kernels_for",
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
    "to_device",
]
