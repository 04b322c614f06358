"""Counting host reads of tensor values: a CPU-measurable proxy for GPU host syncs.

On a GPU every read of a tensor's value on the host (``.item()``, ``.tolist()``, ``bool(t)``,
``int(t)``, ``float(t)``, ``.nonzero()``, ``torch.unique``, ``.cpu()`` / ``.numpy()``, and the
ones torch makes for you: reading or writing through a bool mask or a 0-dim tensor index,
``t[mask]`` / ``t[i] = x``) waits for the device to drain its queue: kernels stop overlapping
with Python. So does a tensor made from host data for a device (``torch.tensor(ids,
device=...)``, ``torch.as_tensor``): an unpinned host -> device copy blocks; and so does
``.to(device)`` of a host array's tensor (``torch.from_numpy``) unless ``non_blocking=True``
(from pinned memory, as ``kernels.to_device`` copies on CUDA).
``torch.cuda.set_sync_debug_mode`` finds them only on CUDA; this counter finds the same call
sites on any device, attributed to the pipeline step (``kvshare.engine.pipeline`` function) and
the first kvshare source line on the stack.
"""

from __future__ import annotations

import sys
import threading
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

import kvshare.anchors
import kvshare.engine.pipeline
import kvshare.errors
import kvshare.kernels

_DIRS = [
    Path(str(m.__file__)).resolve().parent
    for m in (kvshare.errors, kvshare.anchors, kvshare.kernels)
]
_OURS = tuple(str(d) for d in _DIRS)
_ROOT = _DIRS[0].parent
_PIPELINE = str(Path(str(kvshare.engine.pipeline.__file__)).resolve())
BEFORE_FIRST_TOKEN = ("plan", "assemble_prompt", "estimate", "choose", "prefill", "sample_first")
_METHODS = (
    *("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero"),
    *("numpy", "cpu"),
)


class _Guard(threading.local):
    active = False


_guard = _Guard()


def _where() -> tuple[str, str]:
    """(pipeline step, 'file:line function' of the innermost kvshare frame) of the caller."""
    frame: Any = sys._getframe(2)
    site, step = "", "outside the pipeline"
    while frame is not None:
        name = frame.f_code.co_filename
        if not site and name.startswith(_OURS) and "host_reads" not in name:
            site = f"{_short(name)}:{frame.f_lineno} {frame.f_code.co_name}"
        if name == _PIPELINE:
            step = frame.f_code.co_name
            break
        frame = frame.f_back
    return step, site or "torch/transformers"


def _short(path: str) -> str:
    for d in _DIRS:
        if path.startswith(str(d)):
            return f"{d.name}/{Path(path).relative_to(d)}"
    return path


def _reads_index(index: Any) -> bool:
    """Whether indexing with ``index`` reads a tensor's value on the host: a bool mask (its
    size) or a 0-dim tensor (its value)."""
    parts = index if isinstance(index, tuple) else (index,)
    return any(
        isinstance(p, torch.Tensor) and (p.dtype == torch.bool or p.dim() == 0) for p in parts
    )


def _from_host(data: Any, *args: Any, **kwargs: Any) -> bool:
    """``torch.tensor`` / ``as_tensor`` of host data (not a tensor, not empty: an empty tensor
    copies nothing) for an explicit device."""
    if isinstance(data, torch.Tensor) or kwargs.get("device") is None:
        return False
    return not (hasattr(data, "__len__") and len(data) == 0)


class _HostBorn(threading.local):
    """ids of live tensors made from host arrays while counting (``torch.from_numpy``)."""

    ids: set[int] | None = None


_host_born = _HostBorn()


def _blocking_upload(t: Any, *args: Any, **kwargs: Any) -> bool:
    """``.to`` of a host array's tensor toward a device without ``non_blocking``."""
    born = _host_born.ids
    if born is None or id(t) not in born or kwargs.get("non_blocking", False):
        return False
    targets = [*args, kwargs.get("device")]
    return any(isinstance(a, (torch.device, str)) for a in targets if a is not None)


_TESTS: dict[str, Callable[..., bool]] = {
    "__getitem__": lambda _t, index, *a, **k: _reads_index(index),
    "__setitem__": lambda _t, index, *a, **k: _reads_index(index),
    "tensor": _from_host,
    "as_tensor": _from_host,
    "to": _blocking_upload,
}


def _tagging(orig: Callable[..., Any]) -> Callable[..., Any]:
    def from_numpy(array: Any) -> Any:
        out = orig(array)
        born = _host_born.ids
        if born is not None:
            born.add(id(out))
            weakref.finalize(out, born.discard, id(out))  # ids are reused once freed
        return out

    return from_numpy


def _counting(orig: Callable[..., Any], counts: Counter, test: Callable[..., bool] | None):
    def counted(*args: Any, **kwargs: Any) -> Any:
        if _guard.active:
            return orig(*args, **kwargs)
        _guard.active = True
        try:
            if test is None or test(*args, **kwargs):
                counts[_where()] += 1
            return orig(*args, **kwargs)
        finally:
            _guard.active = False

    return counted


@contextmanager
def count_host_reads() -> Iterator[Counter]:
    """Count host reads made while the block runs: ``Counter[(step, site)] -> reads``."""
    counts: Counter = Counter()
    patched: list[tuple[Any, str, Any]] = []
    for name in _METHODS:
        patched.append((torch.Tensor, name, getattr(torch.Tensor, name)))
    for name in ("__getitem__", "__setitem__", "to"):
        patched.append((torch.Tensor, name, getattr(torch.Tensor, name)))
    for name in ("unique", "tensor", "as_tensor"):
        patched.append((torch, name, getattr(torch, name)))
    from_numpy = torch.from_numpy
    _host_born.ids = set()
    try:
        for owner, name, orig in patched:
            setattr(owner, name, _counting(orig, counts, _TESTS.get(name)))
        torch.from_numpy = _tagging(from_numpy)
        yield counts
    finally:
        for owner, name, orig in patched:
            setattr(owner, name, orig)
        torch.from_numpy = from_numpy
        _host_born.ids = None


def before_first_token(counts: Counter) -> int:
    """Reads made by the pipeline steps before the first token is sampled."""
    return sum(n for (step, _), n in counts.items() if step in BEFORE_FIRST_TOKEN)


def top_sites(counts: Counter, n: int = 15) -> list[tuple[str, str, int]]:
    """The ``n`` busiest (step, site, reads), before-first-token steps only."""
    rows = [(s, w, c) for (s, w), c in counts.items() if s in BEFORE_FIRST_TOKEN]
    return sorted(rows, key=lambda r: -r[2])[:n]
