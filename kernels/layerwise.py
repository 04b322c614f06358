"""A masked forward over selected tokens through the first layers only (deviation probes)."""

from __future__ import annotations

from typing import Any

import torch
from kvshare.kernels.kv import KV, gather
from kvshare.kernels.prefill import position_mask
from kvshare.kernels.slots import SlotCache
from torch import Tensor, nn


@torch.inference_mode()
def probe_layers(
    model: nn.Module, cache: KV, ids: Tensor, positions: Tensor, sel: Tensor, upto: int
) -> KV:
    """Fresh KV of the ``sel`` tokens at layers ``[0, upto)``. Returns KV [upto, H, N, D].

    cache: KV [L, H, S, D]; ids/positions: [S]; sel: [N] ascending long indices. The
    unselected tokens serve as the (reused) past, exactly as in ``partial_prefill``; with every
    token selected the result is the exact prefill KV of those layers.
    """
    inner: Any = model.model  # LlamaModel / Qwen2Model / MistralModel
    head = KV(cache.keys[:upto].clone(), cache.values[:upto].clone())  # the probe's scratch
    q_pos = positions[sel]
    mask = position_mask(q_pos, positions, cache.keys.dtype)
    past = SlotCache(head, sel)
    hidden = inner.embed_tokens(ids[sel][None])
    pos_emb = inner.rotary_emb(hidden, q_pos[None])
    for layer in inner.layers[:upto]:
        hidden = layer(
            hidden,
            attention_mask=mask,
            position_embeddings=pos_emb,
            position_ids=q_pos[None],
            past_key_values=past,
            use_cache=True,
        )
    return gather(head, sel)
