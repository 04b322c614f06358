"""One decode step for a batch of sequences with caches of different lengths.

A decode step on a CPU (and a small batch on a GPU) is bound by reading the weights: one
forward over B one-token queries reads them once for all B. :class:`BatchedDecoder` runs
the model's own modules (norms, projections, MLP, head) on [B, 1, E] hidden states and does
the attention itself, each sequence over its own tokens of :class:`DecodeSlots` — one
preallocated buffer [L, B', H, C, D] (a row per sequence, ``lengths`` [B'] valid tokens each)
— with one SDPA call per layer (grouped-query attention native, a [B, 1, 1, S] mask over
the padding only when lengths differ).

The layout is the one :mod:`kvshare.model.adapter` describes (Llama, Qwen2, Mistral) without
a sliding window; :func:`batchable` says whether a model qualifies (else callers step it one
sequence at a time through its own forward). Shapes: B batch, L layers, H kv heads, C slot
capacity, D head dim, E hidden, V vocabulary.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kvshare.kernels.kv import KV
from kvshare.kernels.rope import _rotate_half


def batchable(model: nn.Module) -> bool:
    """True for a Llama/Qwen2/Mistral layout that attends to every cached token."""
    cfg: Any = model.config
    if cfg.model_type not in ("llama", "qwen2", "mistral"):
        return False
    window = getattr(cfg, "sliding_window", None)
    return not window or (cfg.model_type == "qwen2" and not cfg.use_sliding_window)


class DecodeSlots:
    """KV of up to B' sequences being decoded: ``keys``/``values`` [L, B', H, C, D], row b
    valid over ``[0, lengths[b])``. Rows ``[0, rows)`` are in use (``admit`` fills the next,
    ``release`` moves the last row into the freed one); ``grow`` reallocates larger, never
    past ``budget_bytes`` (both buffers together; ``fits`` says whether a row can join)."""

    def __init__(
        self,
        dims: tuple[int, int, int],
        dtype: torch.dtype,
        device: torch.device,
        budget_bytes: int | None = None,
    ) -> None:
        layers, heads, dim = dims
        self.keys = torch.empty(layers, 0, heads, 0, dim, dtype=dtype, device=device)
        self.values = torch.empty_like(self.keys)
        self.lengths: list[int] = []
        self.budget = budget_bytes
        self.token_bytes = 2 * layers * heads * dim * self.keys.element_size()

    @property
    def nbytes(self) -> int:
        """Bytes both buffers hold (allocated rows × capacity, used or not)."""
        return 2 * self.keys.numel() * self.keys.element_size()

    def fits(self, capacity: int) -> bool:
        """Whether one more row of ``capacity`` tokens fits the budget."""
        if self.budget is None:
            return True
        cap = slot_tokens(max(capacity, self.keys.shape[3]))
        return (self.rows + 1) * cap * self.token_bytes <= self.budget

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def grow(self, rows: int, capacity: int) -> None:
        """Room for ``rows`` sequences of ``capacity`` tokens each (contents kept)."""
        layers, have_rows, heads, have_cap, dim = self.keys.shape
        if rows <= have_rows and capacity <= have_cap:
            return
        capacity = slot_tokens(max(capacity, have_cap))
        most = 2 * have_rows  # doubling: a join rarely reallocates
        if self.budget is not None:
            most = min(most, self.budget // (capacity * self.token_bytes))
        rows = max(rows, most)
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros(layers, rows, heads, capacity, dim)  # padding must be finite:
            new[:, : self.rows, :, :have_cap] = old[:, : self.rows]  # masked weight 0 × NaN = NaN
            setattr(self, name, new)

    def admit(self, prompt: KV, capacity: int) -> int:
        """Copy ``prompt`` [L, H, S, D] into a new row able to hold ``capacity`` tokens."""
        n = prompt.length
        self.grow(self.rows + 1, max(capacity, n))
        row = self.rows
        self.keys[:, row, :, :n] = prompt.keys
        self.values[:, row, :, :n] = prompt.values
        self.lengths.append(n)
        return row

    def kv(self, row: int) -> KV:
        """A copy of row's valid tokens, KV [L, H, lengths[row], D]."""
        n = self.lengths[row]
        return KV(self.keys[:, row, :, :n].clone(), self.values[:, row, :, :n].clone())

    def release(self, row: int) -> int | None:
        """Free ``row``; the last row moves into it. Returns the moved row's old index."""
        last = self.rows - 1
        if row != last:
            n = self.lengths[last]
            self.keys[:, row, :, :n] = self.keys[:, last, :, :n]
            self.values[:, row, :, :n] = self.values[:, last, :, :n]
            self.lengths[row] = n
        self.lengths.pop()
        return last if row != last else None


class BatchedDecoder:
    """One decode step over the rows of a :class:`DecodeSlots` (see the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        if not batchable(model):
            kind = getattr(model.config, "model_type", None)
            raise ValueError(f"BatchedDecoder: the {kind} layout is not supported")
        self.model: Any = model
        self.inner: Any = model.model

    @torch.inference_mode()
    def step(self, slots: DecodeSlots, tokens: Tensor, positions: Tensor) -> Tensor:
        """Feed ``tokens`` [B] at ``positions`` [B] (rows ``[0, B)`` of ``slots``, B =
        ``slots.rows``); writes their K/V at each row's length, advances the lengths and
        returns the next-token logits [B, V] float32."""
        b, lengths = slots.rows, slots.lengths
        span = max(lengths) + 1
        dev = slots.keys.device
        at = torch.tensor(lengths, device=dev)
        mask = None
        if min(lengths) != max(lengths):  # padding to hide: [B, 1, 1, S]
            mask = (torch.arange(span, device=dev)[None, :] <= at[:, None])[:, None, None]
        x = self.inner.embed_tokens(tokens[:, None])  # [B, 1, E]
        cos, sin = self.inner.rotary_emb(x, positions[:, None])  # [B, 1, D]
        cos, sin = cos[:, None], sin[:, None]  # [B, 1, 1, D]
        _, _, heads, cap, dim = slots.keys.shape
        # flat row index of (sequence r, head h, slot at[r]) in a layer's [B' * H * C, D] view
        flat = ((torch.arange(b, device=dev)[:, None] * heads + torch.arange(heads, device=dev))
                * cap + at[:, None]).flatten()  # fmt: skip
        for i, layer in enumerate(self.inner.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q, k, v = (_heads(p(h), attn.head_dim) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
            q = q * cos + _rotate_half(q) * sin  # [B, Hq, 1, D]
            k = k * cos + _rotate_half(k) * sin
            slots.keys[i].view(-1, dim).index_copy_(0, flat, k.reshape(-1, dim))
            slots.values[i].view(-1, dim).index_copy_(0, flat, v.reshape(-1, dim))
            keys, values = slots.keys[i, :b, :, :span], slots.values[i, :b, :, :span]
            o = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, scale=attn.scaling, enable_gqa=True
            )
            x = x + attn.o_proj(o.transpose(1, 2).reshape(b, 1, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        for r in range(b):
            lengths[r] += 1
        logits: Tensor = self.model.lm_head(self.inner.norm(x))[:, 0]
        return logits.float()


def slot_tokens(tokens: int) -> int:
    """Slot capacity: whole blocks of 128 tokens."""
    return -(-tokens // 128) * 128


def _heads(x: Tensor, dim: int) -> Tensor:
    """[B, 1, heads * D] -> [B, heads, 1, D]."""
    return x.view(x.shape[0], 1, -1, dim).transpose(1, 2)
