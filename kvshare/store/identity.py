"""The identity of everything that shapes a model's KV: stored KV is valid for it alone.

Two engines compute the same KV for the same tokens only when their weights, their KV-shaping
configuration (rotary parameters and scaling, head layout, norms, sliding windows: every config
field but the few listed in ``NOT_KV`` below), the dtype, the attention implementation and
kvshare's storage format agree. :class:`KVIdentity` holds a digest of each; every stored entry
carries the identity's digest and every read compares it (a directory named after it is only an
index). An unknown config field counts, so a new transformers field can only split identities
(a cache miss), never merge them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch

STORAGE_FORMAT = 2
"""kvshare's format of stored KV (files, and any later shared tier): bumped on any change."""

# Config fields that cannot change a layer's K or V (bookkeeping, generation and head-only).
NOT_KV = frozenset({
    "_name_or_path", "_commit_hash", "transformers_version", "architectures", "use_cache",
    "return_dict", "output_hidden_states", "output_attentions", "torchscript", "dtype",
    "torch_dtype", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id",
    "decoder_start_token_id", "id2label", "label2id", "problem_type", "tokenizer_class",
    "prefix", "task_specific_params", "finetuning_task", "chunk_size_feed_forward",
    "tie_word_embeddings", "pretraining_tp", "_attn_implementation_autoset",
})  # fmt: skip


@dataclass(frozen=True)
class KVIdentity:
    """What stored KV belongs to. ``weights``: digest of every parameter (name, shape, dtype,
    float64 sum and a strided sample); ``config``: digest of the KV-shaping config fields;
    ``dtype``: the parameters' dtype; ``attention``: the attention implementation;
    ``format``: :data:`STORAGE_FORMAT`. ``kvshare.store.disk.model_digest`` hashes it into the
    one string every stored entry carries."""

    architecture: str
    weights: str
    config: str
    dtype: str
    attention: str
    format: int = STORAGE_FORMAT

    @classmethod
    def of(cls, model: Any) -> KVIdentity:
        """The identity of a Hugging Face causal LM (its config and its parameters)."""
        cfg = model.config
        fields = {k: v for k, v in cfg.to_dict().items() if k not in NOT_KV}
        blob = json.dumps(fields, sort_keys=True, default=repr)
        dtype = next(model.parameters()).dtype
        attention = str(getattr(cfg, "_attn_implementation", None))
        config = hashlib.sha256(blob.encode()).hexdigest()[:32]
        return cls(str(cfg.model_type), weights_digest(model), config, str(dtype), attention)


@torch.inference_mode()
def weights_digest(model: Any) -> str:
    """A fingerprint of a model's weights: per parameter its name, shape, dtype, float64 sum
    (one pass over every element) and a strided sample of 256 values."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 256)][:256].float().cpu()
        total = flat.sum(dtype=torch.float64).cpu()
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(sample.numpy().tobytes() + total.numpy().tobytes())
    return h.hexdigest()[:32]
