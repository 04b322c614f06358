"""Partial prefill: recompute an arbitrary subset of tokens against the rest of the cache."""

from __future__ import annotations

from typing import NamedTuple

import torch
from kvshare.kernels.kv import KV, cache_kwargs, output_cache, slice_tokens, splice
from kvshare.kernels.slots import SlotCache
from torch import Tensor, nn


class PrefillResult(NamedTuple):
    """What a (partial) prefill produced.

    kv: KV [L, H, S, D] of the whole sequence, recomputed slots replaced.
    logits: [N_out, V] float32 logits: every recomputed token if ``all_logits`` else only the
        recomputed token with the highest position (the next-token distribution).
    recomputed: [N'] long indices of the tokens actually recomputed (a superset of the request
        when the ordinary-prefill fallback ran), ascending.
    masked: True when the masked path ran, False for the ordinary causal prefill.
    live: [N'] bool over ``recomputed`` when only those were recomputed through every layer
        (a fixed-shape gradual prefill carries dropped tokens on without writing them);
        None: all of them.
    """

    kv: KV
    logits: Tensor
    recomputed: Tensor
    masked: bool
    live: Tensor | None = None


def position_mask(q_pos: Tensor, k_pos: Tensor, dtype: torch.dtype | None) -> Tensor:
    """Attention mask by true positions. q_pos: [N], k_pos: [C]. Returns [1, 1, N, C].

    dtype None: bool, True where the key's position is at or before the query's (what SDPA
    takes; a quarter of the bytes and no scaling pass). A float dtype: additive, 0 there and
    the dtype's minimum elsewhere (eager attention adds the mask to its scores, so a bool
    mask would be silently wrong there).
    """
    if dtype is None:
        return (k_pos[None, :] <= q_pos[:, None])[None, None]
    hidden = k_pos[None, :] > q_pos[:, None]  # one pass to build, one to scale
    return (hidden.to(dtype) * torch.finfo(dtype).min)[None, None]


def mask_dtype(model: nn.Module, dtype: torch.dtype) -> torch.dtype | None:
    """None (a bool mask) when the model attends with SDPA, else ``dtype`` (additive)."""
    return None if getattr(model.config, "_attn_implementation", None) == "sdpa" else dtype


def _is_increasing(positions: Tensor) -> bool:
    return positions.numel() < 2 or bool((positions[1:] > positions[:-1]).all())


@torch.inference_mode()
def causal_tail(
    model: nn.Module,
    cache: KV,
    ids: Tensor,
    positions: Tensor,
    first: int,
    all_logits: bool = False,
) -> PrefillResult:
    """Ordinary prefill of tokens ``[first, S)`` behind the cached tokens ``[0, first)``
    (positions increasing): causal attention, no mask, no device read."""
    past = slice_tokens(cache, 0, first).to_cache()
    out = model(
        input_ids=ids[None, first:],
        position_ids=positions[None, first:],
        use_cache=True,
        **cache_kwargs(model, past),
        logits_to_keep=0 if all_logits else 1,
    )
    fresh = KV.from_cache(output_cache(out), first)
    kv = splice([slice_tokens(cache, 0, first), fresh]) if first else fresh
    recomputed = torch.arange(first, ids.numel(), device=ids.device)
    return PrefillResult(kv, out.logits[0].float(), recomputed, False)


def _masked(
    model: nn.Module, cache: KV, ids: Tensor, positions: Tensor, sel: Tensor, all_logits: bool
) -> PrefillResult:
    """One forward over the selected tokens [N], writing their KV into ``cache`` in place."""
    q_pos = positions[sel]
    mask = position_mask(q_pos, positions, mask_dtype(model, cache.keys.dtype))
    last = q_pos.argmax().reshape(1)
    out = model(
        input_ids=ids[sel][None],
        position_ids=q_pos[None],
        attention_mask=mask,
        use_cache=True,
        **cache_kwargs(model, SlotCache(cache, sel)),
        logits_to_keep=0 if all_logits else last,
    )
    return PrefillResult(cache, out.logits[0].float(), sel, True)


@torch.inference_mode()
def partial_prefill(
    model: nn.Module,
    cache: KV,
    ids: Tensor,
    positions: Tensor,
    recompute: Tensor,
    *,
    max_masked_ratio: float = 0.9,
    all_logits: bool = False,
    inplace: bool = False,
) -> PrefillResult:
    """Recompute the KV of the ``recompute`` tokens exactly, against the rest of ``cache``.

    cache: KV [L, H, S, D] for all S tokens (slots being recomputed may hold anything).
    ids: [S] long token ids; positions: [S] long true positions; recompute: [N] long indices.

    Every selected token attends to the cached KV of the unselected tokens and to the fresh KV
    of the selected tokens whose position is at or before its own (an exact causal mask by
    true positions, so no token ever sees a later one). When positions increase along the
    sequence and the selection covers more than ``max_masked_ratio`` of the span from the first
    selected token to the end, an ordinary causal prefill of that span runs instead (custom
    masks lose the fast causal attention path); it recomputes a superset of the request.
    The masked path writes into a copy of ``cache``, or into ``cache`` itself with
    ``inplace=True`` (the caller owns it and no longer needs the replaced slots).
    """
    if ids.shape != positions.shape or ids.dim() != 1 or ids.numel() != cache.length:
        raise ValueError(
            f"partial_prefill: ids {tuple(ids.shape)}, positions {tuple(positions.shape)} and "
            f"cache of {cache.length} tokens must all describe the same S tokens"
        )
    sel = torch.unique(recompute.to(torch.long))
    if sel.numel() == 0:
        raise ValueError("partial_prefill: nothing selected to recompute")
    if int(sel[0]) < 0 or int(sel[-1]) >= ids.numel():
        raise ValueError(f"partial_prefill: recompute indices out of range [0, {ids.numel()})")
    first = int(sel[0])
    ratio = sel.numel() / (ids.numel() - first)
    if _is_increasing(positions) and ratio > max_masked_ratio:
        return causal_tail(model, cache, ids, positions, first, all_logits)
    if not inplace:
        cache = KV(cache.keys.clone(), cache.values.clone())
    return _masked(model, cache, ids, positions, sel, all_logits)
