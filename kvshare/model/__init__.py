"""kvshare.model — the wing that knows the model: loading (``load``: the embedded GGUF, a local
directory or ``random:SHAPE``), the converted-weights cache (``cache``), random weights of real
shapes (``random``), the one view of a transformers model's parts (``adapter``), chat rendering
and token bounds (``prompt``, ``render_bounds``, ``token_split``, ``token_cache``).

May import: the core (``kvshare.errors``, ``scope``, ``validate``, ``registry``, ``files``) and
``kvshare.kernels``. Nothing here knows about stored KV, anchors, workflows or calls.
"""
