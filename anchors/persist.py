"""Anchor pool files: a checksummed container that cannot execute code when read.

Layout (all integers little-endian)::

    [0, 8)        magic b"KVSPOOL\\0"
    [8, 12)       format version, uint32
    [12, 20)      header length n, uint64
    [20, 20+n)    header: UTF-8 JSON (config, storage dtype, model identity, tick, gains, keys)
    [20+n, -32)   payload: safetensors; key i's tensors are "i.feats", "i.deltas", ...
    [-32, end)    sha256 of every byte before it

Reading checks, in order: magic, checksum, version, header schema, model identity, then every
tensor's dtype, shape and finiteness (those content checks live in
:mod:`kvshare.anchors.checks`); any failure raises :class:`StateFileError` (or
:class:`ModelMismatchError`) and nothing is returned. Writing is atomic: a temporary file in
the target directory, fsync, ``os.replace``; on failure the temporary file is removed and an
existing file at the target path is untouched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import tempfile
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import torch
from kvshare.anchors.checks import bad, check_identity, check_shapes, check_tensor, check_values
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from torch import Tensor

from kvshare.errors import ConfigError, KVShareError, StateFileError
from kvshare.files import fsync_dir

FORMAT_VERSION = 1
MAGIC = b"KVSPOOL\0"
STORAGE = {"float32": torch.float32, "float16": torch.float16, "int8": torch.int8}
_PREFIX = struct.Struct("<8sIQ")  # magic, version, header length
_DIGEST = 32
_STRICT = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, frozen=True)
T = TypeVar("T")


@dataclass(frozen=True)
class ModelIdentity:
    """What an anchor pool's Δ shapes depend on: Δ is [M, layers, 2, kv_heads, head_dim]."""

    architecture: str
    layers: int
    kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        if not isinstance(self.architecture, str) or not self.architecture:
            raise ConfigError("ModelIdentity.architecture must be a non-empty str")
        for name in ("layers", "kv_heads", "head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"ModelIdentity.{name} must be an int >= 1, got {value!r}")

    @classmethod
    def of(cls, model: Any) -> ModelIdentity:
        """The identity of a Hugging Face causal LM, read from ``model.config``."""
        cfg = model.config
        heads = cfg.num_key_value_heads or cfg.num_attention_heads
        dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(str(cfg.model_type), int(cfg.num_hidden_layers), int(heads), int(dim))


@dataclass
class KeyTensors:
    """One context key's anchors (M of them; L, H, D from the model, F feature width).

    feats [M, F] float32; deltas [M, L, 2, H, D] in the storage dtype; scales [M] float32;
    counts [M] float64; hits [M] float64; born [M] int64.
    """

    feats: Tensor
    deltas: Tensor
    scales: Tensor
    counts: Tensor
    hits: Tensor
    born: Tensor


@dataclass
class PoolState:
    """Everything an anchor pool file holds. ``config``: the AnchorConfig fields as a dict."""

    config: dict[str, Any]
    storage: str
    tick: int
    gains: dict[str, tuple[float, float]]
    keys: dict[str, KeyTensors]
    identity: ModelIdentity | None = None


_Gain = Annotated[float, Field(ge=0.0, le=1.0)]


class _Header(BaseModel):
    model_config = _STRICT

    identity: ModelIdentity | None
    storage: Literal["float32", "float16", "int8"]
    config: dict[str, Any]
    tick: int = Field(ge=0)
    gains: dict[str, tuple[_Gain, _Gain]]
    keys: list[str]


_TENSORS = {  # name -> (dtype or None for the storage dtype, ndim)
    "feats": (torch.float32, 2),
    "deltas": (None, 5),
    "scales": (torch.float32, 1),
    "counts": (torch.float64, 1),
    "hits": (torch.float64, 1),
    "born": (torch.int64, 1),
}


# ---------------------------------------------------------------------- writing
def _encode(state: PoolState) -> list[bytes]:
    """The file's bytes before the checksum, as chunks: prefix, header, payload."""
    from safetensors.torch import save

    gains = {k: [float(g[0]), float(g[1])] for k, g in state.gains.items()}
    header = {
        "identity": None if state.identity is None else dataclasses.asdict(state.identity),
        "storage": state.storage,
        "config": state.config,
        "tick": int(state.tick),
        "gains": gains,
        "keys": list(state.keys),
    }
    try:
        head = json.dumps(header, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise StateFileError(f"anchor pool state cannot be written: {exc}") from exc
    tensors = {
        f"{i}.{name}": getattr(key, name).detach().cpu().contiguous()
        for i, key in enumerate(state.keys.values())
        for name in _TENSORS
    }
    return [_PREFIX.pack(MAGIC, FORMAT_VERSION, len(head)), head, save(tensors)]


def _write_chunks(fh: Any, chunks: list[bytes]) -> None:
    """Write ``chunks`` then their sha256 to the open binary file ``fh``."""
    digest = hashlib.sha256()
    for chunk in chunks:
        fh.write(chunk)
        digest.update(chunk)
    fh.write(digest.digest())


def encode_state(state: PoolState) -> bytes:
    """The bytes :func:`write_state` writes for ``state`` (checksum included), in memory."""
    chunks = _encode(state)
    return b"".join([*chunks, hashlib.sha256(b"".join(chunks)).digest()])


def write_state(path: str | os.PathLike[str], state: PoolState) -> None:
    """Write ``state`` to ``path`` atomically; raises StateFileError (nothing changed) on failure.

    The content is written as given (the pool guarantees it is finite; this function does not
    re-check it, so that tests can craft bad files with valid checksums).
    """
    target = Path(path)
    chunks = _encode(state)
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            _write_chunks(fh, chunks)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        tmp = None
    except OSError as exc:
        raise StateFileError(
            f"could not write the anchor pool file {target} ({exc.strerror or exc}); check that "
            f"{target.parent} is an existing, writable directory with free space"
        ) from exc
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    fsync_dir(target.parent)


# ---------------------------------------------------------------------- reading
def read_state(path: str | os.PathLike[str], expected: ModelIdentity | None = None) -> PoolState:
    """Read and fully verify an anchor pool file (see the module docstring for the checks).

    expected: the model the pool will serve; when both it and the file's identity are known
    they must be equal (ModelMismatchError names the differing field).
    Raises StateFileError (or ModelMismatchError); never returns unverified data.
    """
    where = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise StateFileError(
            f"cannot read the anchor pool file {where} ({exc.strerror or exc}); check the path, "
            f"or start with an empty pool"
        ) from exc
    return decode_state(data, expected, where)


def decode_state(data: bytes, expected: ModelIdentity | None, where: str) -> PoolState:
    """:func:`read_state` of bytes held in memory (``where`` names them in errors)."""
    try:
        return _decode(data, expected, where)
    except KVShareError:
        raise
    except Exception as exc:  # a parser's own error on data that passed the checksum
        raise StateFileError(f"anchor pool file {where} is invalid: {exc!r}") from exc


def _decode(data: bytes, expected: ModelIdentity | None, where: str) -> PoolState:
    if len(data) < _PREFIX.size + _DIGEST or data[:8] != MAGIC:
        raise bad(where, "not a kvshare anchor pool file (bad magic or too short)")
    body, digest = data[:-_DIGEST], data[-_DIGEST:]
    if hashlib.sha256(body).digest() != digest:
        raise bad(where, "checksum mismatch (the file is corrupt or truncated)")
    _, version, n = _PREFIX.unpack_from(body)
    if version != FORMAT_VERSION:
        raise bad(where, f"unknown format version {version} (this kvshare reads version 1)")
    if n > len(body) - _PREFIX.size:
        raise bad(where, "header length exceeds the file")
    try:
        header = _Header.model_validate_json(body[_PREFIX.size : _PREFIX.size + n])
    except ValidationError as exc:
        raise bad(where, f"invalid header: {exc}") from exc
    if len(set(header.keys)) != len(header.keys):
        raise bad(where, "duplicate context keys")
    check_identity(header.identity, expected, where)
    keys = _tensors(body[_PREFIX.size + n :], header, where)
    identity = header.identity or expected
    check_shapes(keys, identity, header.identity is not None, where)
    return PoolState(header.config, header.storage, header.tick, header.gains, keys, identity)


def _tensors(payload: bytes, header: _Header, where: str) -> dict[str, KeyTensors]:
    """Parse the safetensors payload into per-key tensors, checking names and dtypes."""
    from safetensors.torch import load

    try:
        flat = load(payload)
    except Exception as exc:
        raise bad(where, f"invalid tensor payload ({exc})") from exc
    want = {f"{i}.{name}" for i in range(len(header.keys)) for name in _TENSORS}
    if set(flat) != want:
        raise bad(where, "the tensors do not match the header's context keys")
    out = {}
    for i, key in enumerate(header.keys):
        parts = {}
        for name, (dtype, ndim) in _TENSORS.items():
            t, label = flat[f"{i}.{name}"], f"{key!r}.{name}"
            parts[name] = check_tensor(t, dtype or STORAGE[header.storage], ndim, label, where)
        out[key] = KeyTensors(**parts)
        check_values(out[key], header.tick, f"{where}: key {key!r}")
    return out


def build_config(cls: type[T], values: dict[str, Any], where: str) -> T:
    """Construct the frozen dataclass ``cls`` from a file's ``values``, strictly typed.

    Unknown or missing fields, wrong types, non-finite floats and values that ``cls`` itself
    rejects all raise StateFileError.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: (hints[f.name], ...) for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    model = create_model("_FileConfig", __config__=_STRICT, **fields)  # type: ignore[call-overload]
    try:
        return cls(**model.model_validate(values).model_dump())
    except (ValidationError, KVShareError, TypeError, ValueError) as exc:
        raise bad(where, f"invalid config: {exc}") from exc
