"""Moving cached keys to new positions with the model's own rotary embedding."""

from __future__ import annotations

import torch
from kvshare.kernels.kv import KV
from torch import Tensor, nn


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_angles(rotary_emb: nn.Module, delta: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """cos/sin of a rotation by ``delta`` positions. delta: [S] long. Returns two [S, D].

    Uses the model's ``rotary_emb`` so that frequency-scaling variants (linear, llama3, yarn)
    keep their own inverse frequencies; the attention scaling factor those variants fold into
    cos/sin is divided out, because a key already carries it once.
    """
    cos, sin = rotary_emb(like, delta[None].to(like.device))
    scale = float(getattr(rotary_emb, "attention_scaling", 1.0) or 1.0)
    return (cos[0] / scale).to(like.dtype), (sin[0] / scale).to(like.dtype)


def shift_rope(keys: Tensor, delta: Tensor, rotary_emb: nn.Module) -> Tensor:
    """Rotate post-RoPE keys by a per-token position delta.

    keys: [L, H, S, D] computed at positions p; delta: [S] long. Returns keys at p + delta:
    ``k' = k * cos(delta) + rotate_half(k) * sin(delta)``. Deltas may be negative.
    """
    if delta.numel() != keys.shape[2]:
        raise ValueError(f"shift_rope: {delta.numel()} deltas for {keys.shape[2]} tokens")
    if keys.shape[2] == 0:
        return keys
    cos, sin = rope_angles(rotary_emb, delta, keys)
    return keys * cos + _rotate_half(keys) * sin


def shift_kv(kv: KV, delta: Tensor | int, rotary_emb: nn.Module) -> KV:
    """KV [L, H, S, D] moved by ``delta`` positions (an int or a per-token [S] tensor)."""
    if isinstance(delta, int):
        if delta == 0:
            return kv
        delta = torch.full((kv.length,), delta, dtype=torch.long)
    return KV(shift_rope(kv.keys, delta, rotary_emb), kv.values)
