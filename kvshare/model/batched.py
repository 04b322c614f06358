"""One decode step for a batch of sequences with caches of different lengths.

A decode step on a CPU (and a small batch on a GPU) is bound by reading the weights: one
forward over B one-token queries reads them once for all B. :class:`BatchedDecoder` runs
the model's own modules (norms, projections, MLP, head) on [B, 1, E] hidden states and does
the attention itself, each sequence over its own tokens of :class:`DecodeSlots` — one
preallocated buffer [L, B', H, C, D] (a row per sequence, ``lengths`` [B'] valid tokens each)
— with one SDPA call per layer (grouped-query attention native, a [B, 1, 1, S] mask over
the padding only when lengths differ). Rows that start with a prefix held once
(:mod:`kvshare.model.shared_prefix`) keep only what follows it; a step attends to each
shared prefix once for all its rows and merges by log-sum-exp.

The layout is the one :mod:`kvshare.model.adapter` describes (Llama, Qwen2, Mistral) without
a sliding window; :func:`batchable` says whether a model qualifies (else callers step it one
sequence at a time through its own forward). Shapes: B batch, L layers, H kv heads, C slot
capacity, D head dim, E hidden, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kvshare.kernels.kv import KV, splice
from kvshare.kernels.rope import _rotate_half
from kvshare.model.chunked import Chunk, write_kv
from kvshare.model.chunked import attention as chunk_attention
from kvshare.model.shared_prefix import SharedPrefix, ShareKey, attend_rows


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
    past ``budget_bytes`` (both buffers together; ``fits`` says whether a row can join).
    A row admitted with a shared prefix holds only the tokens after it: ``prefixes[b]`` (its
    :class:`SharedPrefix`, held once in ``held`` by key, refcounted) comes first, so its
    tokens sit at positions ``offset(b) + [0, lengths[b])``."""

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
        self.prefixes: list[SharedPrefix | None] = []
        self.held: dict[Hashable, SharedPrefix] = {}
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

    def admit(self, prompt: KV, capacity: int, shared: ShareKey | None = None) -> int:
        """A new row for ``prompt`` [L, H, S, D], able to hold ``capacity`` tokens in all.
        ``shared``: (key, parts) of a prefix of ``prompt`` (parts [L, H, P_i, D], P < S, equal
        to ``prompt``'s first P tokens: the caller's promise) to hold once and not copy."""
        prefix = self._hold(shared) if shared is not None else None
        skip = prefix.length if prefix is not None else 0
        n = prompt.length - skip
        self.grow(self.rows + 1, max(capacity - skip, n))
        row = self.rows
        self.keys[:, row, :, :n] = prompt.keys[:, :, skip:]
        self.values[:, row, :, :n] = prompt.values[:, :, skip:]
        self.lengths.append(n)
        self.prefixes.append(prefix)
        return row

    def _hold(self, shared: ShareKey) -> SharedPrefix:
        key, parts = shared
        prefix = self.held.setdefault(key, SharedPrefix(parts, key))
        prefix.refs += 1
        return prefix

    def offset(self, row: int) -> int:
        """Tokens of ``row``'s shared prefix (0: none)."""
        prefix = self.prefixes[row]
        return prefix.length if prefix is not None else 0

    def positions(self) -> list[int]:
        """Each row's next position: its shared prefix's tokens plus its own."""
        return [self.offset(r) + n for r, n in enumerate(self.lengths)]

    def groups(self) -> list[tuple[SharedPrefix, list[int]]]:
        """Each shared prefix in use and its rows, ascending."""
        found: dict[int, tuple[SharedPrefix, list[int]]] = {}
        for r, prefix in enumerate(self.prefixes):
            if prefix is not None:
                found.setdefault(id(prefix), (prefix, []))[1].append(r)
        return list(found.values())

    @property
    def used_bytes(self) -> int:
        """Bytes of the rows' valid tokens (``nbytes`` less the free capacity)."""
        return sum(self.lengths) * self.token_bytes

    @property
    def held_bytes(self) -> int:
        """Bytes of the shared prefixes held (each once; the prefix cache's own tensors)."""
        return sum(p.nbytes for p in list(self.held.values()))  # read from other threads

    def kv(self, row: int) -> KV:
        """A copy of row's tokens, shared prefix first: KV [L, H, offset + lengths[row], D]."""
        n, prefix = self.lengths[row], self.prefixes[row]
        keys, values = self.keys[:, row, :, :n], self.values[:, row, :, :n]
        if prefix is None:
            return KV(keys.clone(), values.clone())
        return splice([*prefix.parts, KV(keys, values)])  # concatenated: a new tensor

    def release(self, row: int) -> int | None:
        """Free ``row`` (and its hold on a shared prefix); the last row moves into it.
        Returns the moved row's old index."""
        prefix = self.prefixes[row]
        if prefix is not None:
            prefix.refs -= 1
            if prefix.refs == 0:
                del self.held[prefix.key]
        last = self.rows - 1
        if row != last:
            n = self.lengths[last]
            self.keys[:, row, :, :n] = self.keys[:, last, :, :n]
            self.values[:, row, :, :n] = self.values[:, last, :, :n]
            self.lengths[row], self.prefixes[row] = n, self.prefixes[last]
        self.lengths.pop()
        self.prefixes.pop()
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
        ``slots.rows``; ``slots.positions()``); writes their K/V at each row's length,
        advances the lengths and returns the next-token logits [B, V] float32."""
        return self.forward(slots, tokens, positions)[0]

    @torch.inference_mode()
    def forward(
        self,
        slots: DecodeSlots | None,
        tokens: Tensor,
        positions: Tensor,
        chunk: Chunk | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """:meth:`step` with a prefill ``chunk`` [C tokens] in the same forward (B may be 0:
        ``slots`` None). Returns the decode logits [B, V] and, for the prompt's last chunk,
        its last token's logits [V] (float32)."""
        b = slots.rows if slots is not None else 0
        x = self.inner.embed_tokens(tokens)  # [B, E]
        pos = positions
        if chunk is not None:
            x = torch.cat([x, self.inner.embed_tokens(chunk.ids)])  # [B + C, E]
            pos = torch.cat([positions, chunk.positions()])
        cos, sin = self.inner.rotary_emb(x, pos[None])  # [1, B + C, D]
        rope = cos[0, :, None], sin[0, :, None]  # [B + C, 1, D]
        attend = _Decode(slots, b) if slots is not None and b else None
        for i, layer in enumerate(self.inner.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q, k, v = (p(h).view(h.shape[0], -1, attn.head_dim)
                       for p in (attn.q_proj, attn.k_proj, attn.v_proj))  # fmt: skip
            q, k = (t * rope[0] + _rotate_half(t) * rope[1] for t in (q, k))  # [B + C, *, D]
            parts = []
            if attend is not None:  # [B, heads, D] -> [B, heads, 1, D]
                parts.append(attend(i, q[:b, :, None], k[:b, :, None], v[:b, :, None], attn))
            if chunk is not None:  # [C, heads, D] -> [1, heads, C, D]
                qc, kc, vc = (t[b:].transpose(0, 1)[None] for t in (q, k, v))
                write_kv(chunk, i, kc, vc)
                oc = chunk_attention(chunk, i, qc, attn.scaling)  # [1, Hq, C, D]
                parts.append(oc[0].transpose(0, 1).reshape(-1, q.shape[1] * q.shape[2]))
            o = parts[0] if len(parts) == 1 else torch.cat(parts)
            x = x + attn.o_proj(o)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        if slots is not None:
            for r in range(b):
                slots.lengths[r] += 1
        last = [b + int(chunk.ids.numel()) - 1] if chunk is not None and chunk.last else []
        rows = x[list(range(b)) + last] if last else x[:b]
        logits: Tensor = self.model.lm_head(self.inner.norm(rows)).float()
        return logits[:b], (logits[b] if last else None)


class _Decode:
    """One step's decode attention over the rows of ``slots`` (B = ``b``): the slot each
    row writes, the padding mask and the shared-prefix groups, made once per step."""

    def __init__(self, slots: DecodeSlots, b: int) -> None:
        self.slots, self.b = slots, b
        dev, lengths = slots.keys.device, slots.lengths
        self.groups = [(p, torch.tensor(r, device=dev)) for p, r in slots.groups()]
        self.span = max(lengths) + 1
        at = torch.tensor(lengths, device=dev)
        self.mask = None
        if min(lengths) != max(lengths):  # padding to hide: [B, 1, 1, S]
            self.mask = (torch.arange(self.span, device=dev)[None, :] <= at[:, None])[:, None, None]
        _, _, heads, cap, self.dim = slots.keys.shape
        # flat row index of (sequence r, head h, slot at[r]) in a layer's [B' * H * C, D] view
        rows, kv_heads = torch.arange(b, device=dev), torch.arange(heads, device=dev)
        self.flat = ((rows[:, None] * heads + kv_heads) * cap + at[:, None]).flatten()

    def __call__(self, i: int, q: Tensor, k: Tensor, v: Tensor, attn: Any) -> Tensor:
        """Layer i: writes k, v [B, H, 1, D] at each row's length and returns the rows'
        attention output [B, Hq * D] for q [B, Hq, 1, D]."""
        slots, b, dim, span = self.slots, self.b, self.dim, self.span
        slots.keys[i].view(-1, dim).index_copy_(0, self.flat, k.reshape(-1, dim))
        slots.values[i].view(-1, dim).index_copy_(0, self.flat, v.reshape(-1, dim))
        keys, values = slots.keys[i, :b, :, :span], slots.values[i, :b, :, :span]
        if self.groups:  # shared prefixes: attended once per group, merged (shared_prefix)
            o = attend_rows(q, keys, values, attn.scaling, self.mask, self.groups, i)
        else:
            o = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=self.mask, scale=attn.scaling, enable_gqa=True
            )
        return o.transpose(1, 2).reshape(b, -1)


def slot_tokens(tokens: int) -> int:
    """Slot capacity: whole blocks of 128 tokens."""
    return -(-tokens // 128) * 128
