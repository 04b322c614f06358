"""Shared fixtures: tiny random models per RoPE family (unit tests) and the real model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from kvshare import Engine, EngineConfig
from kvshare.model import load as model_loading

FAMILIES = ("llama", "qwen2", "mistral")
pytest_plugins = ("serving", "redis_server")  # HTTP server (tests/serve), redis-server fixtures

# Without a GPU the Triton kernels run in Triton's interpreter (set before triton is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
        ],
    ),
]


def tiny_config(family: str, **overrides: object):
    """A 2-layer random config of ``family`` sized for fast CPU tests (vocab of SmolLM2)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,
    )
    common.update(overrides)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)
    if family == "mistral":
        return MistralConfig(**common, sliding_window=None)
    raise ValueError(family)


def tiny_model(family: str, seed: int = 0, **overrides: object):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(family, **overrides)
    cfg._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def default_dir() -> Path:
    """The converted embedded model (converted once per KVSHARE_HOME)."""
    return model_loading.resolve(None)


@pytest.fixture(scope="session")
def tokenizer(default_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_dir), local_files_only=True)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> dict[str, Path]:
    """A saved tiny random model directory per family, with the SmolLM2 tokenizer."""
    out = {}
    for family in FAMILIES:
        path = tmp_path_factory.mktemp(f"tiny-{family}")
        tiny_model(family).save_pretrained(str(path))
        tokenizer.save_pretrained(str(path))
        out[family] = path
    return out


@pytest.fixture(scope="session")
def tiny_engine(tiny_dirs: dict[str, Path]) -> Engine:
    return Engine.from_pretrained(str(tiny_dirs["llama"]), config=EngineConfig(mode="prefix"))


@pytest.fixture(scope="session")
def real_engine() -> Engine:
    return Engine.from_pretrained(config=EngineConfig(mode="prefix"))
