"""Per-key anchor storage of :class:`~kvshare.anchors.pool.AnchorPool`, and its eviction.

:class:`KeyEntry` holds one context key's M anchors (features, stored Δ, scales and the
counters that rank them); the functions here encode Δ into the storage dtype (int8: per-token
absmax scale) and back, decide which tokens the storage dtype can hold, merge and append
anchors, search a key's k-NN index (``kvshare.anchors.knn``) and weight its neighbours' Δ
on the pool's device, convert to and from the
file format's :class:`KeyTensors`, and evict the least useful anchors (usefulness =
(hits + 1) / (1 + age_weight · age)). None of them lock: the pool calls them with its lock
held. Shapes: L layers, H KV heads, D head dim, F feature
width, M anchors of a key, N new tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from kvshare.anchors.knn import KNNIndex
from kvshare.anchors.persist import KeyTensors
from kvshare.kernels import kernels_for
from torch import Tensor


@dataclass
class KeyEntry:
    """One context key's anchors; ``index``: its k-NN index (kept in step with the anchors
    in place, built once); ``tau``: its distance scale, ``dirty`` until recalibrated.

    ``deltas`` and ``scales`` live on the pool's device; features and counters on the host.
    """

    feats: np.ndarray  # [M, F] float32
    deltas: Tensor  # [M, L, 2, H, D] in storage dtype
    scales: Tensor  # [M] float32 (int8 storage), ones otherwise
    counts: np.ndarray  # [M] merged observations
    hits: np.ndarray  # [M] times used in an estimate
    born: np.ndarray  # [M] tick of last update
    index: KNNIndex | None = None
    _norms: Tensor | None = None

    @property
    def norms(self) -> Tensor:
        """[M] float32 L2 norm of every anchor's Δ, on the Δ's device (cached until the key
        changes)."""
        if self._norms is None or len(self._norms) != len(self.feats):
            flat = self.deltas.flatten(1).float()
            self._norms = flat.norm(dim=1) * self.scales
        return self._norms

    tau: float | Tensor = 1.0  # a 0-dim tensor on the index's device once calibrated
    dirty: bool = True
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Δ + scales + features twice (the faiss flat index holds its own copy) + counters."""
        counters = self.counts.nbytes + self.hits.nbytes + self.born.nbytes
        return int(2 * self.feats.nbytes + self.deltas.nbytes + self.scales.nbytes + counters)


# ---------------------------------------------------------------------- storage codec
def encode(delta: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """delta [M, ...] float -> (stored [M, ...] in ``dtype``, scales [M] float32)."""
    if dtype is torch.int8:
        scale = delta.flatten(1).abs().amax(1).clamp_min(1e-8) / 127.0
        q = (delta / scale.view(-1, *[1] * (delta.dim() - 1))).round().clamp(-127, 127)
        return q.to(torch.int8), scale.float()
    return delta.to(dtype), torch.ones(delta.shape[0])


def decode(stored: Tensor, scales: Tensor) -> Tensor:
    """stored [M, ...], scales [M] -> Δ [M, ...] float32 (the inverse of :func:`encode`)."""
    out = stored.float()
    return out * scales.view(-1, *[1] * (out.dim() - 1)) if stored.dtype is torch.int8 else out


def admissible(f: np.ndarray, d: Tensor, dtype: torch.dtype) -> np.ndarray:
    """[N] bool: finite features and a Δ that the storage ``dtype`` holds without overflow.

    f: [N, F]; d: [N, L, 2, H, D] float32. (NaN fails every comparison, inf the range.)
    """
    limit = torch.finfo(dtype if dtype.is_floating_point else torch.float32).max
    fits = (d.flatten(1).abs().amax(1) <= limit).numpy()
    return np.isfinite(f).all(1) & fits


# ---------------------------------------------------------------------- learning
def merge(entry: KeyEntry, j: int, delta: Tensor, dtype: torch.dtype, tick: int) -> None:
    """Fold ``delta`` [L, 2, H, D] into anchor j's running mean (in float64: the sum of
    admissible values cannot overflow, so the mean stays finite in the storage dtype)."""
    c = float(entry.counts[j])
    old = decode(entry.deltas[j : j + 1], entry.scales[j : j + 1])[0]
    mean = ((old.double() * c + delta.to(old.device).double()) / (c + 1)).float()
    stored, scale = encode(mean[None], dtype)
    entry.deltas[j], entry.scales[j] = stored[0], scale[0]
    entry.counts[j] += 1
    entry.born[j] = tick
    entry._norms = None


def appended(
    old: KeyEntry | None,
    f: np.ndarray,
    d: Tensor,
    dtype: torch.dtype,
    tick: int,
    device: torch.device,
) -> KeyEntry:
    """A new entry: ``old``'s anchors (if any) then N new ones. f: [N, F]; d: [N, L, 2, H, D]
    (stored on ``device``). ``old``'s index, if built, gets the N rows appended in place."""
    stored, scales = (t.to(device) for t in encode(d, dtype))
    m = len(f)
    fresh = KeyEntry(f, stored, scales, np.ones(m), np.zeros(m), np.full(m, tick))
    if old is None:
        return fresh
    if old.index is not None:
        old.index.append(f)
    return KeyEntry(
        np.concatenate([old.feats, f]),
        torch.cat([old.deltas, stored]),
        torch.cat([old.scales, scales]),
        np.concatenate([old.counts, fresh.counts]),
        np.concatenate([old.hits, fresh.hits]),
        np.concatenate([old.born, fresh.born]),
        index=old.index,
    )


# ---------------------------------------------------------------------- estimation
def prepare(entry: KeyEntry, make: type[KNNIndex], device: torch.device) -> None:
    """Build ``entry``'s k-NN index (``make``) if it has none (a new key, a loaded file), and
    recalibrate ``entry.tau`` (the median nearest-other-anchor distance, one search on the
    index's device) if its anchors changed. The pool calls it when it learns, loads or
    evicts, after a call's first token, so a search never builds or calibrates in a call."""
    if entry.index is None:
        entry.index = make(entry.feats, device)
        entry.dirty = True
    if not entry.dirty:
        return
    if len(entry.feats) > 1:
        d, _ = entry.index.search(torch.from_numpy(entry.feats), 2)
        entry.tau = _median(d[:, 1]).clamp_min(1e-4)
    entry.dirty = False


def search(
    entry: KeyEntry, queries: Tensor, k: int, make: type[KNNIndex], device: torch.device
) -> tuple[Tensor, Tensor]:
    """(squared L2 distances, anchor ids), each [N, min(k, M)] on ``device``, of the nearest
    anchors of ``entry`` to ``queries`` [N, F] (an index not prepared yet is built first)."""
    prepare(entry, make, device)
    assert entry.index is not None
    return entry.index.search(queries, k)


def _median(x: Tensor) -> Tensor:
    """numpy's median (the mean of the two middle values for an even count), on x's device
    with no host read: a 0-dim float32 tensor."""
    s = x.float().sort().values
    n = s.numel()
    return (s[(n - 1) // 2] + s[n // 2]) / 2


def weighted(entry: KeyEntry, index: Tensor, w: Tensor) -> Tensor:
    """Σ_j w[:, j]·Δ[index[:, j]] as [N, F] float32; index, w: [N, k] (the kernels
    registry's ``weighted_delta`` on the pool's device, int8 scales applied)."""
    deltas = entry.deltas.flatten(1)
    return kernels_for(deltas.device).weighted_delta(deltas, entry.scales, index, w)


# ---------------------------------------------------------------------- file format
def to_tensors(e: KeyEntry) -> KeyTensors:
    """A host copy of the entry in the file format (merges mutate Δ in place)."""
    return KeyTensors(
        torch.from_numpy(e.feats.copy()),
        e.deltas.to("cpu", copy=True),
        e.scales.to("cpu", copy=True),
        torch.from_numpy(e.counts.astype(np.float64)),
        torch.from_numpy(e.hits.astype(np.float64)),
        torch.from_numpy(e.born.astype(np.int64)),
    )


def from_tensors(t: KeyTensors, device: torch.device) -> KeyEntry:
    """The entry of a verified file's key, Δ and scales on ``device`` (on CPU the tensors'
    memory is shared)."""
    d, s = t.deltas.to(device), t.scales.to(device)
    return KeyEntry(t.feats.numpy(), d, s, t.counts.numpy(), t.hits.numpy(), t.born.numpy())


# ---------------------------------------------------------------------- eviction
def usefulness(entry: KeyEntry, tick: int, age_weight: float) -> np.ndarray:
    """[M] (hits + 1) / (1 + age_weight · age): higher is kept longer."""
    age = tick - entry.born
    return (entry.hits + 1.0) / (1.0 + age_weight * age)


def _keep(keys: dict[str, KeyEntry], key: str, keep: np.ndarray) -> int:
    """Keep the anchors of ``key`` where ``keep`` [M] is True (drop the key if none);
    returns the number dropped."""
    e = keys[key]
    sel = torch.from_numpy(keep).to(e.deltas.device)
    dropped = int((~keep).sum())
    if not keep.any():
        del keys[key]
        return dropped
    if e.index is not None:
        e.index.keep(keep)
    keys[key] = KeyEntry(
        e.feats[keep],
        e.deltas[sel],
        e.scales[sel],
        e.counts[keep],
        e.hits[keep],
        e.born[keep],
        index=e.index,
    )
    return dropped


def evict(
    keys: dict[str, KeyEntry], target: int, max_per_key: int, tick: int, age_weight: float
) -> int:
    """Per-key cap, then ``target`` bytes, dropping the least useful anchors first; mutates
    ``keys`` and returns the number of anchors evicted."""
    evicted = 0
    for key in list(keys):
        e = keys[key]
        if len(e.feats) > max_per_key:
            order = np.argsort(-usefulness(e, tick, age_weight), kind="stable")
            keep = np.zeros(len(e.feats), dtype=bool)
            keep[order[:max_per_key]] = True
            evicted += _keep(keys, key, keep)
    while keys and _bytes(keys) > target:
        per_token = {k: e.nbytes / len(e.feats) for k, e in keys.items()}
        excess = _bytes(keys) - target
        useful = {k: usefulness(e, tick, age_weight) for k, e in keys.items()}
        scored = sorted((u, k, i) for k, us in useful.items() for i, u in enumerate(us))
        drop: dict[str, list[int]] = {}
        freed = 0.0
        for _, k, i in scored:
            drop.setdefault(k, []).append(i)
            freed += per_token[k]
            if freed >= excess:
                break
        for k, idx in drop.items():
            keep = np.ones(len(keys[k].feats), dtype=bool)
            keep[idx] = False
            evicted += _keep(keys, k, keep)
    return evicted


def _bytes(keys: dict[str, KeyEntry]) -> int:
    return sum(e.nbytes for e in keys.values())
