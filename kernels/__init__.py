"""Tensor operations of the hot path: torch reference implementations, and the kernels
registry (``kernels_for``) that picks torch or Triton versions of the fused ops.

Shape glossary: B batch, L layers, H kv heads, S tokens, D head dim, N selected, V vocabulary.

Wing: ``kernels``, the lowest above the core. May import: the core (``kvshare.errors``,
``registry``) only; knows no model layout (``gradual_prefill`` drives a ``LayerStack``).
"""

# Imported by a bare name from the repo root: yield to the installed package (_unshadow.py).
if __name__ != "kvshare.kernels":
    import runpy

    _here = __path__[0]
    runpy.run_path(f"{_here}/../kvshare/_unshadow.py")["hand_over"](__name__, _here)
else:
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
    from kvshare.kernels.layerwise import LayerStack, Narrow, Sizes, compact, gradual_prefill
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
        "LayerStack",
        "Narrow",
        "PrefillResult",
        "Sizes",
        "cache_kwargs",
        "compact",
        "gather",
        "gradual_prefill",
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
