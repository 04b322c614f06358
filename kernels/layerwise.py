"""Gradual prefill: one layer-by-layer forward whose token set narrows at check layers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from kvshare.kernels.kv import KV, cache_kwargs
from kvshare.kernels.prefill import PrefillResult, mask_dtype, position_mask
from kvshare.kernels.slots import SlotCache
from torch import Tensor, nn

Narrow = Callable[[int, Tensor, KV, KV], Tensor]
"""(layer, sel [N], fresh KV [1, H, N, D], previous KV [1, H, N, D]) -> keep [N] bool."""

Sizes = Callable[[int, int], "int | None"]
"""(layer, N) -> how many tokens the narrowing keeps there, when known on the host."""


def compact(keep: Tensor, count: int | None) -> Tensor:
    """Ascending indices [K] of the True entries of ``keep`` [N]. With ``count`` (= K, known
    on the host) a stable sort finds them at a fixed size, reading nothing; without it
    ``nonzero`` reads the size from the device."""
    if count is None:
        return keep.nonzero().flatten()
    return keep.to(torch.int8).argsort(descending=True, stable=True)[:count]


def _layer_kv(cache: KV, layer: int, sel: Tensor) -> KV:
    return KV(cache.keys[layer : layer + 1, :, sel], cache.values[layer : layer + 1, :, sel])


class LayerStack(Protocol):
    """What a gradual prefill needs of a model, layer by layer (``kvshare.model.adapter.
    ModelAdapter`` is one: the kernels never reach into a model's modules themselves).
    Shapes: ids [N]; hidden [1, N, E]; positions [N]; cos, sin [1, N, D]."""

    model: nn.Module

    @property
    def layers(self) -> Sequence[nn.Module]: ...

    def embed(self, ids: Tensor) -> Tensor: ...

    def rope(self, hidden: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]: ...

    def logits(self, hidden: Tensor) -> Tensor: ...

    def layer_kv(self, layer: nn.Module, hidden: Tensor, cos: Tensor, sin: Tensor) -> KV:
        """The K/V ``layer`` caches for ``hidden``, keys rotated: KV [1, H, N, D]."""
        ...


@torch.inference_mode()
def gradual_prefill(
    parts: LayerStack,
    cache: KV,
    ids: Tensor,
    positions: Tensor,
    sel: Tensor,
    check_layers: tuple[int, ...],
    narrow: Narrow,
    sizes: Sizes | None = None,
    fixed_shapes: bool = False,
) -> PrefillResult:
    """Recompute ``sel`` layer by layer through ``parts`` (a :class:`LayerStack`), narrowing
    the set at every check layer, in place.

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

    sizes: how many tokens ``narrow`` keeps at a layer when the host knows it (the kept set
    is then found without a device read; :func:`compact`). fixed_shapes: where that is not
    known, carry the whole set on instead of reading its size, writing only the kept tokens'
    KV from there up (``SlotCache.live``): the same KV, no host read, more arithmetic.

    Returns PrefillResult with ``recomputed`` = the tokens computed through every layer
    (with ``live`` set: those of them that wrote).
    """
    model = parts.model
    sel = sel.to(torch.long)  # ascending and unique by contract (no device read to check)
    q_pos = positions[sel]
    mask = position_mask(q_pos, positions, mask_dtype(model, cache.keys.dtype))
    past = SlotCache(cache, sel)
    hidden = parts.embed(ids[sel])
    cos, sin = parts.rope(hidden, q_pos)
    layers = parts.layers
    last_layer = len(layers) - 1
    checks = {c for c in check_layers if c < last_layer}
    for index, layer in enumerate(layers):
        if index in checks:
            fresh = parts.layer_kv(layer, hidden, cos, sin)
            keep = narrow(index, sel, fresh, _layer_kv(cache, index, sel)).clone()
            keep |= q_pos == q_pos.max()  # the last token goes on (no 0-dim index: no sync)
            past.write(index, sel, past.only_live(index, fresh))  # dropped ones' fresh KV
            count = sizes(index, sel.numel()) if sizes is not None else None
            if past.live is not None or (count is None and fixed_shapes):
                past.live = keep if past.live is None else past.live & keep
            else:
                kept = compact(keep, count)
                sel, q_pos, hidden = sel[kept], q_pos[kept], hidden.index_select(1, kept)
                mask = mask.index_select(2, kept)
                cos, sin = cos.index_select(1, kept), sin.index_select(1, kept)
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
    logits = parts.logits(hidden[:, last])
    return PrefillResult(cache, logits[0].float(), sel, True, past.live)
