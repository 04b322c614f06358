"""Gradual prefill: one layer-by-layer forward whose token set narrows at check layers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from kvshare.kernels.kv import KV, cache_kwargs
from kvshare.kernels.prefill import PrefillResult, position_mask
from kvshare.kernels.rope import _rotate_half
from kvshare.kernels.slots import SlotCache
from torch import Tensor, nn

Narrow = Callable[[int, Tensor, KV, KV], Tensor]
"""(layer, sel [N], fresh KV [1, H, N, D], previous KV [1, H, N, D]) -> keep [N] bool."""


def _layer_kv(cache: KV, layer: int, sel: Tensor) -> KV:
    return KV(cache.keys[layer : layer + 1, :, sel], cache.values[layer : layer + 1, :, sel])


def layer_kv(layer: nn.Module, hidden: Tensor, cos: Tensor, sin: Tensor) -> KV:
    """The K/V a decoder layer caches for ``hidden`` [1, N, E], keys rotated: KV [1, H, N, D].

    Only the input norm and the K/V projections (what the layer's own attention would compute
    before it attends); cos, sin: [1, N, D] of the tokens' positions.
    """
    attn: Any = layer.self_attn
    norm: Any = layer.input_layernorm
    x = norm(hidden)
    shape = (*x.shape[:-1], -1, attn.head_dim)
    keys = attn.k_proj(x).view(shape).transpose(1, 2)  # [1, H, N, D]
    values = attn.v_proj(x).view(shape).transpose(1, 2)
    keys = keys * cos[:, None] + _rotate_half(keys) * sin[:, None]
    return KV(keys, values)


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
    indices. Layers below the first check layer run over all of ``sel``. At check layer c the
    fresh K/V of the current set are projected first (input norm + K/V projections only),
    written into the cache, and ``narrow`` sees them beside the previous KV of that layer and
    says which tokens go on (the token with the highest position always does: its logits are
    returned); only those run layer c's attention and MLP and the layers above. A token
    dropped at check layer c thus keeps fresh KV at layers ``[0, c]`` and the cached KV above,
    and costs nothing at layer c beyond its K/V projection. At every layer each computed query
    attends, by true positions, to the fresh KV of the tokens computed at that layer and to
    the cached KV of the rest; with nothing dropped this is exactly ``partial_prefill`` of
    ``sel``. This is CacheBlend's gradual filtering: the deviation probes are part of the
    prefill itself, not extra forwards.

    Returns PrefillResult with ``recomputed`` = the tokens computed through every layer.
    """
    inner: Any = model.model  # LlamaModel / Qwen2Model / MistralModel
    sel = torch.unique(sel.to(torch.long))
    q_pos = positions[sel]
    mask = position_mask(q_pos, positions, cache.keys.dtype)
    past = SlotCache(cache, sel)
    hidden = inner.embed_tokens(ids[sel][None])
    cos, sin = inner.rotary_emb(hidden, q_pos[None])
    last_layer = len(inner.layers) - 1
    checks = {c for c in check_layers if c < last_layer}
    for index, layer in enumerate(inner.layers):
        if index in checks:
            fresh = layer_kv(layer, hidden, cos, sin)
            keep = narrow(index, sel, fresh, _layer_kv(cache, index, sel)).clone()
            keep[q_pos.argmax()] = True
            past.write(index, sel, fresh)  # the dropped tokens' fresh KV of this layer
            sel, q_pos, hidden = sel[keep], q_pos[keep], hidden[:, keep]
            mask, cos, sin = mask[:, :, keep], cos[:, keep], sin[:, keep]
            past.slots = sel
        hidden = layer(
            hidden,
            attention_mask=mask,
            position_embeddings=(cos, sin),
            position_ids=q_pos[None],
            use_cache=True,
            **cache_kwargs(layer, past),
        )
    last = q_pos.argmax().reshape(1)
    head: Any = model.lm_head
    logits = head(inner.norm(hidden[:, last]))
    return PrefillResult(cache, logits[0].float(), sel, True)
