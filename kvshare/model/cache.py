"""The converted-model cache: GGUF files dequantised once into Hugging Face directories.

Each GGUF is converted into ``$KVSHARE_HOME/models/<stem>-<sha256[:16]>/`` (safetensors +
tokenizer) so later loads take about a second. The key is the GGUF's full content hash,
cached in ``$KVSHARE_HOME/hash-index.json`` by (resolved path, size, mtime_ns, ctime_ns) so
an unchanged file is never re-read. A conversion runs in ``.<stem>-partial-*`` (owner PID
recorded; stale ones are removed by the next conversion), writes a marker with the size and
sha256 of every file, and is renamed into place. Every lookup checks the files against the
marker (a stat each; hashes through the index) and re-converts a damaged cache. Which
architectures may be converted is decided by the caller (:func:`kvshare.model.load.converted_dir`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from kvshare.errors import CacheDirError

COMPLETE_MARKER = "kvshare-complete.json"
MARKER_FORMAT = 2  # 1: no file table (pre-0.1 caches are re-converted)
OWNER_FILE = ".kvshare-owner.json"  # in a partial conversion: {"pid", "host"}
HASH_INDEX = "hash-index.json"  # under $KVSHARE_HOME: cached sha256 of GGUF and outputs
STALE_PARTIAL_S = 3600.0


def kvshare_home() -> Path:
    """The cache root: ``$KVSHARE_HOME`` or ``~/.cache/kvshare``."""
    return Path(os.environ.get("KVSHARE_HOME") or Path.home() / ".cache" / "kvshare")


def sha256_file(path: Path) -> str:
    """Full sha256 of ``path``'s content (hex), read in 1 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _stamp(path: Path) -> list[int]:
    """What must not change for a cached hash to stay valid: size, mtime_ns, ctime_ns."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _read_index() -> dict[str, Any]:
    """The hash index ``{resolved path: {"stamp": [...], "sha256": hex}}``; {} if unreadable."""
    try:
        index = json.loads((kvshare_home() / HASH_INDEX).read_text())
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) else {}


def _write_index(index: dict[str, Any]) -> None:
    """Replace the index atomically, dropping entries of vanished files. Best effort: a
    read-only home still works, it only re-hashes."""
    index = {k: v for k, v in index.items() if os.path.exists(k)}
    home = kvshare_home()
    tmp = None
    try:
        home.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=home, prefix=f".{HASH_INDEX}.", suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(index, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, home / HASH_INDEX)
        tmp = None
    except OSError:
        pass
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _indexed_hash(path: Path) -> str | None:
    """``path``'s sha256 if the hash index holds it for the file as it is now, else None."""
    entry = _read_index().get(str(path.resolve()))
    if isinstance(entry, dict) and entry.get("stamp") == _stamp(path):
        return str(entry.get("sha256"))
    return None


def _hashes(paths: list[Path], known: list[str] | None = None) -> list[str]:
    """Full sha256 of every path, hashed only when its (resolved path, size, mtime_ns,
    ctime_ns) is not in the hash index, which is then updated; ``known``: hashes to record
    without reading the files (computed just before, under another path)."""
    index, out, changed = _read_index(), [], False
    for i, path in enumerate(paths):
        key, stamp = str(path.resolve()), _stamp(path)
        entry = index.get(key)
        if known is not None or not (isinstance(entry, dict) and entry.get("stamp") == stamp):
            entry = {"stamp": stamp, "sha256": known[i] if known else sha256_file(path)}
            index[key], changed = entry, True
        out.append(str(entry.get("sha256")))
    if changed:
        _write_index(index)
    return out


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


def write_converted(gguf: Path, out: Path) -> None:
    """Dequantise ``gguf`` into ``out`` as an HF directory (safetensors + tokenizer)."""
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


def _seal(out: Path, gguf: Path, digest: str) -> None:
    """Write the complete marker: size and sha256 of every file, each fsynced first."""
    files = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file() and p.name != OWNER_FILE):
        with path.open("rb") as fh:
            os.fsync(fh.fileno())
        name = str(path.relative_to(out))
        files[name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    marker = {"format": MARKER_FORMAT, "source": str(gguf), "gguf_sha256": digest, "files": files}
    with (out / COMPLETE_MARKER).open("w") as fh:
        json.dump(marker, fh)
        fh.flush()
        os.fsync(fh.fileno())
    (out / OWNER_FILE).unlink(missing_ok=True)


def _marker_files(directory: Path) -> dict[str, tuple[int, str]] | None:
    """{file: (size, sha256)} from the marker; None if it is missing, corrupt or older."""
    try:
        marker = json.loads((directory / COMPLETE_MARKER).read_text())
        if marker["format"] != MARKER_FORMAT:
            return None
        return {name: (int(m["size"]), str(m["sha256"])) for name, m in marker["files"].items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def _is_complete(directory: Path) -> bool:
    """Every file the marker lists is present with its size (a stat each) and its sha256
    (through the hash index: re-read only if the file changed since it was recorded)."""
    files = _marker_files(directory)
    if files is None:
        return False
    paths = [directory / name for name in files]
    if [p.stat().st_size if p.is_file() else -1 for p in paths] != [s for s, _ in files.values()]:
        return False
    return _hashes(paths) == [h for _, h in files.values()]


def _is_stale(partial: Path) -> bool:
    """A partial conversion directory older than STALE_PARTIAL_S, or whose owner (a process
    on this host, recorded in OWNER_FILE) is gone."""
    try:
        if time.time() - partial.stat().st_mtime > STALE_PARTIAL_S:
            return True
        owner = json.loads((partial / OWNER_FILE).read_text())
        pid, host = int(owner["pid"]), owner["host"]
    except (OSError, ValueError, TypeError, KeyError):
        return False  # being created (no owner file yet) or vanished meanwhile
    return host == socket.gethostname() and not _alive(pid)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by another user
    return True


def _clean_partials(root: Path) -> None:
    """Remove partial conversions left by killed processes (``.<stem>-partial-*``)."""
    for partial in root.glob(".*-partial-*"):
        if partial.is_dir() and _is_stale(partial):
            shutil.rmtree(partial, ignore_errors=True)


def _convert(gguf: Path, digest: str, final: Path) -> Path:
    """Convert into a partial directory (owned by this PID), seal it, rename it to ``final``."""
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{gguf.stem}-partial-"))
    try:
        owner = {"pid": os.getpid(), "host": socket.gethostname()}
        (tmp / OWNER_FILE).write_text(json.dumps(owner))
        write_converted(gguf, tmp)
        _seal(tmp, gguf, digest)
        if _is_complete(final):  # another process finished first
            return final
        shutil.rmtree(final, ignore_errors=True)  # missing, incomplete or damaged
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    files = _marker_files(final) or {}
    _hashes([final / name for name in files], [h for _, h in files.values()])
    return final


def lookup(gguf: Path) -> Path | None:
    """``gguf``'s verified converted directory if the hash index knows the file as it is now
    and the directory matches its marker; else None. Never reads the GGUF itself."""
    root = kvshare_home() / "models"
    known = _indexed_hash(gguf)
    if known is not None and _is_complete(root / f"{gguf.stem}-{known[:16]}"):
        return root / f"{gguf.stem}-{known[:16]}"
    return None


def ensure_converted(gguf: Path) -> Path:
    """Hash ``gguf`` in full (unless indexed); return its verified converted directory, or
    convert it atomically (raises CacheDirError if the cache root is not writable)."""
    root = kvshare_home() / "models"
    (digest,) = _hashes([gguf])
    final = root / f"{gguf.stem}-{digest[:16]}"
    if _is_complete(final):
        return final
    _ensure_writable(root)
    _clean_partials(root)
    return _convert(gguf, digest, final)
