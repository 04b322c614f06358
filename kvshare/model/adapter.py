"""The one place that knows how a transformers causal LM is laid out inside.

Llama, Qwen2 and Mistral share one layout: ``model.model`` holds ``embed_tokens``,
``rotary_emb``, ``layers`` (each with ``input_layernorm`` and ``self_attn.k_proj / v_proj``)
and ``norm``; ``model.lm_head`` maps hidden states to logits. Everything in kvshare that
reaches into those modules goes through :class:`ModelAdapter`, so a new family (or a
transformers release that moves them) is one file to change.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from kvshare.kernels.kv import KV
from kvshare.kernels.rope import _rotate_half


class ModelAdapter:
    """Views of one model's parts. Shapes: hidden [1, N, E]; cos, sin [1, N, D]."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.inner: Any = model.model  # LlamaModel / Qwen2Model / MistralModel

    @property
    def rotary(self) -> nn.Module:
        rotary: nn.Module = self.inner.rotary_emb
        return rotary

    @staticmethod
    def rotary_of(config: Any) -> nn.Module:
        """The rotary embedding a model of ``config`` would build, without its weights."""
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
        from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

        if config.model_type == "qwen2":
            return Qwen2RotaryEmbedding(config)
        return LlamaRotaryEmbedding(config)

    @property
    def layers(self) -> list[nn.Module]:
        return list(self.inner.layers)

    @property
    def kv_dims(self) -> tuple[int, int, int]:
        """(L layers, H kv heads, D head dim) of the KV the model caches."""
        cfg: Any = self.model.config
        heads = cfg.num_key_value_heads or cfg.num_attention_heads
        dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return int(cfg.num_hidden_layers), int(heads), int(dim)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def embed(self, ids: Tensor) -> Tensor:
        """ids [N] -> hidden [1, N, E]."""
        hidden: Tensor = self.inner.embed_tokens(ids[None])
        return hidden

    def rope(self, hidden: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin [1, N, D] of ``positions`` [N] (hidden gives dtype and device)."""
        cos, sin = self.inner.rotary_emb(hidden, positions[None])
        return cos, sin

    def logits(self, hidden: Tensor) -> Tensor:
        """Final norm and LM head: hidden [1, N, E] -> logits [1, N, V]."""
        head: Any = self.model.lm_head
        out: Tensor = head(self.inner.norm(hidden))
        return out

    @staticmethod
    def layer_kv(layer: nn.Module, hidden: Tensor, cos: Tensor, sin: Tensor) -> KV:
        """The K/V a decoder layer caches for ``hidden``, keys rotated: KV [1, H, N, D].

        Only the input norm and the K/V projections (what the layer's own attention computes
        before it attends).
        """
        attn: Any = layer.self_attn
        norm: Any = layer.input_layernorm
        x = norm(hidden)
        shape = (*x.shape[:-1], -1, attn.head_dim)
        keys = attn.k_proj(x).view(shape).transpose(1, 2)  # [1, H, N, D]
        values = attn.v_proj(x).view(shape).transpose(1, 2)
        keys = keys * cos[:, None] + _rotate_half(keys) * sin[:, None]
        return KV(keys, values)


@contextmanager
def between_layers(layers: Sequence[nn.Module], fn: Callable[[], None]) -> Iterator[None]:
    """While inside, ``fn()`` runs before every layer's forward on this thread (other
    threads' forwards through the same modules are left alone). It may raise to stop the
    forward."""
    me = threading.get_ident()

    def hook(module: nn.Module, args: object) -> None:
        if threading.get_ident() == me:
            fn()

    hooks = [layer.register_forward_pre_hook(hook) for layer in layers]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
