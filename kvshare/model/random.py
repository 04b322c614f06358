"""Random-weight models of real shapes (``random:NAME``), for timing where weights are absent.

A ``random:llama-8b`` engine has Llama-3-8B's layer count, widths, heads, vocabulary and RoPE
parameters with random weights, and the embedded SmolLM2 tokenizer (its ids are valid in every
vocabulary here). Valid for speed, never for fidelity: the bench marks fidelity and task
columns "n/a (random weights)". The model is built directly on the target device and dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvshare.errors import ModelNotFoundError

PREFIX = "random:"
_LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


@dataclass(frozen=True)
class Shape:
    """The architecture of a named model, without its weights."""

    family: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    rope: dict[str, Any]
    tied: bool = False
    context: int = 8192


SHAPES = {
    "llama-8b": Shape("llama", 32, 4096, 32, 8, 14336, 128256, {"rope_theta": 5e5, **_LLAMA3}),
    "llama-1b": Shape(
        "llama", 16, 2048, 32, 8, 8192, 128256, {"rope_theta": 5e5, **_LLAMA3, "factor": 32.0}, True
    ),
    "qwen2-7b": Shape("qwen2", 28, 3584, 28, 4, 18944, 152064, {"rope_theta": 1e6}),
    "smollm2-135m": Shape("llama", 30, 576, 9, 3, 1536, 49152, {"rope_theta": 1e5}, True),
    "tiny-deep": Shape("llama", 32, 64, 4, 2, 128, 49152, {"rope_theta": 1e4}, True),
}


def is_random(name: object) -> bool:
    """Whether a model argument names a random-weight shape."""
    return isinstance(name, str) and name.startswith(PREFIX)


def random_config(name: str) -> Any:
    """The transformers config of ``random:NAME``; ModelNotFoundError names the known shapes."""
    from transformers import LlamaConfig, Qwen2Config

    shape = name[len(PREFIX) :]
    if shape not in SHAPES:
        raise ModelNotFoundError(
            f"unknown random-weight shape {shape!r}; choose one of "
            f"{', '.join(PREFIX + s for s in SHAPES)}"
        )
    sh = SHAPES[shape]
    common: dict[str, Any] = dict(
        vocab_size=sh.vocab,
        hidden_size=sh.hidden,
        intermediate_size=sh.intermediate,
        num_hidden_layers=sh.layers,
        num_attention_heads=sh.heads,
        num_key_value_heads=sh.kv_heads,
        max_position_embeddings=sh.context,
        rope_parameters=dict(sh.rope),
        tie_word_embeddings=sh.tied,
        bos_token_id=1,
        eos_token_id=2,
    )
    if sh.family == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)
    return LlamaConfig(**common)


def random_model(name: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Any:
    """``random:NAME`` built on ``device`` in ``dtype`` (seeded), eval mode, SDPA attention."""
    from transformers import AutoModelForCausalLM

    config = random_config(name)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()
