"""Position-free per-token features and deviations for anchor matching.

Feature: the layer-``feature_layer`` key and value of each token in its *base* (stored) KV,
keys un-rotated to position 0, averaged over kv heads, concatenated and L2-normalised:
[2D]. An early layer holds mostly token identity plus local context — what decides how a
token's KV shifts when its context changes — while staying cheap, and un-rotating makes the
feature independent of where the segment was stored.
"""

from __future__ import annotations

import torch
from kvshare.kernels import KV, shift_rope
from torch import Tensor, nn


def token_features(base: KV, positions: Tensor, rotary: nn.Module, layer: int) -> Tensor:
    """base: KV [L, H, N, D] at ``positions`` [N]. Returns float32 [N, 2D]."""
    keys = shift_rope(base.keys[layer : layer + 1], -positions, rotary)[0]  # [H, N, D]
    vals = base.values[layer]
    feat = torch.cat([keys.mean(0), vals.mean(0)], dim=-1).float()
    return feat / feat.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def position_free(delta: KV, positions: Tensor, rotary: nn.Module) -> KV:
    """A deviation measured at ``positions`` [N], keys un-rotated to position 0: [L, H, N, D]."""
    return KV(shift_rope(delta.keys, -positions, rotary), delta.values)


def at_positions(delta: KV, positions: Tensor, rotary: nn.Module) -> KV:
    """A position-free deviation re-rotated to ``positions`` [N] (exact inverse)."""
    return KV(shift_rope(delta.keys, positions, rotary), delta.values)
