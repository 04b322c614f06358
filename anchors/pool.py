"""AnchorPool: observed, position-free KV deviations matched token by token with faiss.

An anchor token records, for a token relocated from a source context into a target
context, Δ = KV_in_target_context − KV_relocated for every layer (K and V), keys un-rotated to
position 0. Anchors are grouped by context key ``source -> target`` (producing agent and slot
-> consuming agent and slot), since the deviation depends on both ends. A new token's offset
is Σ softmax(−d/τ)·Δ over its k nearest anchor tokens of the same key (d: squared L2 distance
of features, τ: the key's median nearest-neighbour distance, recalibrated on every rebuild).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from kvshare.errors import ConfigError

STORAGE = {"float32": torch.float32, "float16": torch.float16, "int8": torch.int8}


@dataclass(frozen=True)
class AnchorConfig:
    """neighbours: k of the k-NN estimate. merge_distance: a new anchor closer than this (squared
    L2 of unit features) to an existing one of its key is merged into it (running mean).
    budget_bytes: cap on everything the pool holds (Δ, scales, features and their faiss copy,
    counters). storage: dtype of stored Δ (int8: per-token
    absmax scale). age_weight: usefulness = (hits + 1) / (1 + age_weight · age)."""

    neighbours: int = 4
    merge_distance: float = 0.002
    budget_bytes: int = 256 << 20
    storage: str = "float16"
    age_weight: float = 0.01
    max_per_key: int = 4096

    def __post_init__(self) -> None:
        if self.neighbours < 1:
            raise ConfigError("neighbours must be >= 1")
        if self.storage not in STORAGE:
            raise ConfigError(f"storage must be one of {sorted(STORAGE)}, got {self.storage!r}")
        if self.budget_bytes < 0 or self.merge_distance < 0 or self.max_per_key < 1:
            raise ConfigError("budget_bytes, merge_distance must be >= 0; max_per_key >= 1")


class Estimate(NamedTuple):
    """delta: [L, 2, H, N, D] float32 position-free offsets (zeros where nothing matched).
    distance: [N] nearest-anchor distance / τ (inf when the key has no anchors).
    entropy: [N] entropy of the softmax weights over the neighbours.
    spread: [N] weighted std of the neighbours' Δ norms, relative to their mean."""

    delta: Tensor
    distance: Tensor
    entropy: Tensor
    spread: Tensor


@dataclass
class _Key:
    feats: np.ndarray  # [M, F] float32
    deltas: Tensor  # [M, L, 2, H, D] in storage dtype
    scales: Tensor  # [M] float32 (int8 storage), ones otherwise
    counts: np.ndarray  # [M] merged observations
    hits: np.ndarray  # [M] times used in an estimate
    born: np.ndarray  # [M] tick of last update
    index: Any = None
    _norms: np.ndarray | None = None

    @property
    def norms(self) -> np.ndarray:
        """[M] L2 norm of every anchor's Δ (cached until the key changes)."""
        if self._norms is None or len(self._norms) != len(self.feats):
            flat = self.deltas.flatten(1).float()
            self._norms = (flat.norm(dim=1) * self.scales).numpy()
        return self._norms

    tau: float = 1.0
    dirty: bool = True
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Δ + scales + features twice (the faiss flat index holds its own copy) + counters."""
        counters = self.counts.nbytes + self.hits.nbytes + self.born.nbytes
        return int(2 * self.feats.nbytes + self.deltas.nbytes + self.scales.nbytes + counters)


class AnchorPool:
    """Thread-safe pool of anchors; see the module docstring for the estimate."""

    def __init__(self, config: AnchorConfig | None = None) -> None:
        self.config = config or AnchorConfig()
        self._keys: dict[str, _Key] = {}
        self._tick = 0
        self._lock = threading.Lock()
        self.evicted = 0
        self._gains: dict[str, tuple[float, float]] = {}

    # ------------------------------------------------------------------ accounting
    @property
    def bytes_used(self) -> int:
        return sum(k.nbytes for k in self._keys.values())

    def __len__(self) -> int:
        return sum(len(k.feats) for k in self._keys.values())

    def context_keys(self) -> list[str]:
        return list(self._keys)

    def size(self, key: str) -> int:
        entry = self._keys.get(key)
        return 0 if entry is None else len(entry.feats)

    # ------------------------------------------------------------------ validated gain
    def gain(self, key: str) -> tuple[float, float]:
        """(K, V) share of this key's estimates that calls found worth applying: a running
        mean of the gains fitted against fresh KV at check layers; (1, 1) before any fit."""
        with self._lock:
            return self._gains.get(key, (1.0, 1.0))

    def record_gain(self, key: str, gain_k: float, gain_v: float, rate: float = 0.3) -> None:
        """Fold one call's fitted gains (each in [0, 1]) into the key's running mean."""
        with self._lock:
            old_k, old_v = self._gains.get(key, (gain_k, gain_v))
            self._gains[key] = (
                (1 - rate) * old_k + rate * gain_k,
                (1 - rate) * old_v + rate * gain_v,
            )

    # ------------------------------------------------------------------ storage codec
    def _encode(self, delta: Tensor) -> tuple[Tensor, Tensor]:
        """delta [M, ...] float -> (stored, scales [M])."""
        dtype = STORAGE[self.config.storage]
        if dtype is torch.int8:
            scale = delta.flatten(1).abs().amax(1).clamp_min(1e-8) / 127.0
            q = (delta / scale.view(-1, *[1] * (delta.dim() - 1))).round().clamp(-127, 127)
            return q.to(torch.int8), scale.float()
        return delta.to(dtype), torch.ones(delta.shape[0])

    @staticmethod
    def _decode(stored: Tensor, scales: Tensor) -> Tensor:
        out = stored.float()
        return out * scales.view(-1, *[1] * (out.dim() - 1)) if stored.dtype is torch.int8 else out

    # ------------------------------------------------------------------ learning
    def add(self, key: str, feats: Tensor, delta: Tensor) -> int:
        """Admit observed deviations. feats: [N, F]; delta: [L, 2, H, N, D] position-free.

        Near-duplicates of an existing anchor are merged (count-weighted mean); the rest are
        appended. Returns the number of new anchor tokens; evicts to stay within budget.
        """
        n = feats.shape[0]
        if n == 0:
            return 0
        d = delta.permute(3, 0, 1, 2, 4).to("cpu", torch.float32, copy=True)  # [N, L, 2, H, D]
        f = feats.float().cpu().numpy().astype(np.float32)
        with self._lock:
            self._tick += 1
            entry = self._keys.get(key)
            if entry is not None and len(entry.feats):
                dist, idx = self._search(entry, f, 1)
                dup = dist[:, 0] <= self.config.merge_distance
                for i in np.nonzero(dup)[0]:
                    self._merge(entry, int(idx[i, 0]), d[i])
                f, d = f[~dup], d[torch.from_numpy(~dup)]
            added = len(f)
            if added:
                self._append(key, f, d)
            self._evict_locked()
            return added

    def _merge(self, entry: _Key, j: int, delta: Tensor) -> None:
        c = float(entry.counts[j])
        mean = (self._decode(entry.deltas[j : j + 1], entry.scales[j : j + 1])[0] * c + delta) / (
            c + 1
        )
        stored, scale = self._encode(mean[None])
        entry.deltas[j], entry.scales[j] = stored[0], scale[0]
        entry.counts[j] += 1
        entry.born[j] = self._tick
        entry._norms = None

    def _append(self, key: str, f: np.ndarray, d: Tensor) -> None:
        stored, scales = self._encode(d)
        m = len(f)
        fresh = _Key(f, stored, scales, np.ones(m), np.zeros(m), np.full(m, self._tick))
        old = self._keys.get(key)
        if old is not None:
            fresh = _Key(
                np.concatenate([old.feats, f]),
                torch.cat([old.deltas, stored]),
                torch.cat([old.scales, scales]),
                np.concatenate([old.counts, fresh.counts]),
                np.concatenate([old.hits, fresh.hits]),
                np.concatenate([old.born, fresh.born]),
            )
        self._keys[key] = fresh

    # ------------------------------------------------------------------ eviction
    def _usefulness(self, entry: _Key) -> np.ndarray:
        age = self._tick - entry.born
        return (entry.hits + 1.0) / (1.0 + self.config.age_weight * age)

    def _keep(self, key: str, keep: np.ndarray) -> None:
        e = self._keys[key]
        sel = torch.from_numpy(keep)
        self.evicted += int((~keep).sum())
        if not keep.any():
            del self._keys[key]
            return
        self._keys[key] = _Key(
            e.feats[keep], e.deltas[sel], e.scales[sel], e.counts[keep], e.hits[keep], e.born[keep]
        )

    def _evict_locked(self) -> None:
        """Per-key cap, then the global byte budget, dropping the least useful anchors first."""
        for key in list(self._keys):
            e = self._keys[key]
            if len(e.feats) > self.config.max_per_key:
                order = np.argsort(-self._usefulness(e), kind="stable")
                keep = np.zeros(len(e.feats), dtype=bool)
                keep[order[: self.config.max_per_key]] = True
                self._keep(key, keep)
        while self._keys and self.bytes_used > self.config.budget_bytes:
            per_token = {k: e.nbytes / len(e.feats) for k, e in self._keys.items()}
            excess = self.bytes_used - self.config.budget_bytes
            scored = [
                (u, k, i) for k, e in self._keys.items() for i, u in enumerate(self._usefulness(e))
            ]
            scored.sort()
            drop: dict[str, list[int]] = {}
            freed = 0.0
            for _, k, i in scored:
                drop.setdefault(k, []).append(i)
                freed += per_token[k]
                if freed >= excess:
                    break
            for k, idx in drop.items():
                keep = np.ones(len(self._keys[k].feats), dtype=bool)
                keep[idx] = False
                self._keep(k, keep)

    # ------------------------------------------------------------------ estimation
    def _search(self, entry: _Key, f: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import faiss  # lazy: only needed once anchors exist

        if entry.dirty or entry.index is None:
            index = faiss.IndexFlatL2(entry.feats.shape[1])
            index.add(entry.feats)
            entry.index = index
            if len(entry.feats) > 1:
                d, _ = index.search(entry.feats, 2)
                entry.tau = max(float(np.median(d[:, 1])), 1e-4)
            entry.dirty = False
        k = min(k, len(entry.feats))
        dist, idx = entry.index.search(f, k)
        return dist, idx

    def estimate(self, key: str, feats: Tensor, shape: tuple[int, ...]) -> Estimate:
        """Offsets for N tokens of context ``key``. feats: [N, F]; shape: (L, 2, H, D)."""
        n = feats.shape[0]
        layers, two, heads, dim = shape
        with self._lock:
            entry = self._keys.get(key)
            if entry is None or n == 0:
                inf = torch.full((n,), float("inf"))
                return Estimate(
                    torch.zeros(layers, two, heads, n, dim), inf, inf.clone(), torch.zeros(n)
                )
            dist, idx = self._search(
                entry, feats.float().cpu().numpy().astype(np.float32), self.config.neighbours
            )
            np.add.at(entry.hits, idx.flatten(), 1)
            d = torch.from_numpy(dist) / entry.tau
            w = torch.softmax(-d, dim=1)  # [N, k]
            index = torch.from_numpy(idx)
            delta = self._weighted(entry, index, w)
            norms = torch.from_numpy(entry.norms)[index]  # [N, k]
            mean = (w * norms).sum(1)
            spread = (w * (norms - mean[:, None]) ** 2).sum(1).sqrt() / mean.clamp_min(1e-8)
            entropy = -(w * w.clamp_min(1e-12).log()).sum(1)
            delta = delta.view(n, layers, two, heads, dim).permute(1, 2, 3, 0, 4).contiguous()
            return Estimate(delta, d[:, 0], entropy, spread)

    def _weighted(self, entry: _Key, index: Tensor, w: Tensor, chunk: int = 16) -> Tensor:
        """Σ_j w[:, j]·Δ[index[:, j]] as [N, F]; index, w: [N, k].

        A few rows at a time: their [rows, k, F] neighbours are decoded once and reduced with
        one batched matmul while still in cache (a loop over neighbour ranks would stream the
        whole [N, F] accumulator k times).
        """
        n, k = index.shape
        out = torch.empty(n, entry.deltas[0].numel())
        for s in range(0, n, chunk):
            rows = index[s : s + chunk].flatten()
            nb = self._decode(entry.deltas[rows], entry.scales[rows]).view(-1, k, out.shape[1])
            out[s : s + chunk] = torch.bmm(w[s : s + chunk, None, :], nb)[:, 0]
        return out

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> None:
        """Write the pool to ``path`` (a torch file; loads with :meth:`load`)."""
        with self._lock:
            state = {
                "config": self.config.__dict__,
                "tick": self._tick,
                "gains": dict(self._gains),
                "keys": {
                    k: {
                        "feats": torch.from_numpy(e.feats),
                        "deltas": e.deltas,
                        "scales": e.scales,
                        "counts": torch.from_numpy(e.counts),
                        "hits": torch.from_numpy(e.hits),
                        "born": torch.from_numpy(e.born),
                    }
                    for k, e in self._keys.items()
                },
            }
        tmp = Path(str(path) + ".tmp")
        torch.save(state, tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> AnchorPool:
        state = torch.load(path, weights_only=True)
        pool = cls(AnchorConfig(**state["config"]))
        pool._tick = int(state["tick"])
        pool._gains = {k: (float(g[0]), float(g[1])) for k, g in state.get("gains", {}).items()}
        for k, e in state["keys"].items():
            pool._keys[k] = _Key(
                e["feats"].numpy(),
                e["deltas"],
                e["scales"],
                e["counts"].numpy(),
                e["hits"].numpy(),
                e["born"].numpy(),
            )
        return pool
