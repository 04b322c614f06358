"""Gradual prefill: one layer-by-layer forward whose token set narrows at check layers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from kvshare.kernels.kv import KV
from kvshare.kernels.prefill import PrefillResult, position_mask
from kvshare.kernels.slots import SlotCache
from torch import Tensor, nn

Narrow = Callable[[int, Tensor, KV, KV], Tensor]
"""(layer, sel [N], fresh KV [1, H, N, D], previous KV [1, H, N, D]) -> keep [N] bool."""


def _layer_kv(cache: KV, layer: int, sel: Tensor) -> KV:
    return KV(cache.keys[layer : layer + 1, :, sel], cache.values[layer : layer + 1, :, sel])


@torch.inference_mode()
def gradual_prefill(
    model: nn.Module,
    cache: KV,
    ids: Tensor,
    positions: Tensor,
    sel: Tensor,
    check_layers: tuple[int, ...],
    narrow: Narrow,
) -> PrefillResult:
    """Recompute ``sel`` layer by layer, narrowing the set at every check layer, in place.

    cache: KV [L, H, S, D], overwritten in place; ids/positions: [S]; sel: [N] ascending long
    indices. Layer 0 to the first check layer run over all of ``sel``; after each check layer
    ``narrow`` sees the fresh and the previous KV of that layer and says which tokens go on
    (the token with the highest position always does: its logits are returned). A token
    dropped after check layer c keeps its fresh KV at layers ``[0, c]`` and the cached KV
    above. At every layer each computed query attends, by true positions, to the fresh KV of
    the tokens computed at that layer and to the cached KV of the rest; with nothing dropped
    this is exactly ``partial_prefill`` of ``sel``. This is CacheBlend's gradual filtering:
    the deviation probes are the first layers of the prefill itself, not extra forwards.

    Returns PrefillResult with ``recomputed`` = the tokens computed through every layer.
    """
    inner: Any = model.model  # LlamaModel / Qwen2Model / MistralModel
    sel = torch.unique(sel.to(torch.long))
    q_pos = positions[sel]
    mask = position_mask(q_pos, positions, cache.keys.dtype)
    past = SlotCache(cache, sel)
    hidden = inner.embed_tokens(ids[sel][None])
    cos, sin = inner.rotary_emb(hidden, q_pos[None])
    checks = set(check_layers)
    for index, layer in enumerate(inner.layers):
        before = _layer_kv(cache, index, sel) if index in checks else None
        hidden = layer(
            hidden,
            attention_mask=mask,
            position_embeddings=(cos, sin),
            position_ids=q_pos[None],
            past_key_values=past,
            use_cache=True,
        )
        if before is None or index == len(inner.layers) - 1:
            continue
        keep = narrow(index, sel, _layer_kv(cache, index, sel), before).clone()
        keep[q_pos.argmax()] = True
        sel, q_pos, hidden = sel[keep], q_pos[keep], hidden[:, keep]
        mask, cos, sin = mask[:, :, keep], cos[:, keep], sin[:, keep]
        past.slots = sel
    last = q_pos.argmax().reshape(1)
    head: Any = model.lm_head
    logits = head(inner.norm(hidden[:, last]))
    return PrefillResult(cache, logits[0].float(), sel, True)
