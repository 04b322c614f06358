"""AnchorPool: observed, position-free KV deviations matched token by token with faiss.

An anchor token records, for a token relocated from a source context into a target
context, Δ = KV_in_target_context − KV_relocated for every layer (K and V), keys un-rotated to
position 0. Anchors are grouped by context key ``source -> target`` (producing agent and slot
-> consuming agent and slot), since the deviation depends on both ends. A new token's offset
is Σ softmax(−d/τ)·Δ over its k nearest anchor tokens of the same key (d: squared L2 distance
of features, τ: the key's median nearest-neighbour distance, recalibrated on every rebuild).
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from kvshare.anchors.persist import (
    STORAGE,
    KeyTensors,
    ModelIdentity,
    PoolState,
    build_config,
    read_state,
    write_state,
)
from torch import Tensor

from kvshare.errors import StateFileError
from kvshare.validate import check_choice, check_float, check_int


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
        """Types, finiteness and ranges of every field (ConfigError naming the field)."""
        check_int("neighbours", self.neighbours, 1, 1024)
        check_float("merge_distance", self.merge_distance, 0.0, 4.0)
        check_int("budget_bytes", self.budget_bytes, 0, 1 << 50)
        check_choice("storage", self.storage, tuple(STORAGE))
        check_float("age_weight", self.age_weight, 0.0, 1e6)
        check_int("max_per_key", self.max_per_key, 1, 1 << 30)


class Estimate(NamedTuple):
    """delta: [L, 2, H, N, D] float32 position-free offsets (zeros where nothing matched).
    distance: [N] nearest-anchor distance / τ (inf when the key has no anchors).
    entropy: [N] entropy of the softmax weights over the neighbours.
    spread: [N] weighted std of the neighbours' Δ norms, relative to their mean.
    anchor_ids: [N, k] long: the anchors used (``count_hits`` takes it; [N, 0] if none)."""

    delta: Tensor
    distance: Tensor
    entropy: Tensor
    spread: Tensor
    anchor_ids: Tensor = torch.zeros(0, 0, dtype=torch.long)


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
        self.rejected_nonfinite = 0  # tokens refused by add(): NaN/inf feature or Δ
        self._gains: dict[str, tuple[float, float]] = {}

    # ------------------------------------------------------------------ accounting
    @property
    def bytes_used(self) -> int:
        return sum(k.nbytes for k in self._keys.values())

    def __len__(self) -> int:
        return sum(len(k.feats) for k in self._keys.values())

    def context_keys(self) -> list[str]:
        return list(self._keys)

    def token_bytes(self, layers: int, heads: int, dim: int) -> int:
        """Bytes one anchor token takes for a model of this KV shape (what ``add`` admits)."""
        delta = layers * 2 * heads * dim * STORAGE[self.config.storage].itemsize
        return 2 * (2 * dim) * 4 + delta + 4 + 3 * 8  # features twice, Δ, scale, counters

    def fingerprint(self) -> tuple:
        """Everything that steers an estimate, summarised: tokens, bytes, keys, hit total,
        gains, tick (equal fingerprints: no learning happened in between)."""
        with self._lock:
            hits = sum(float(e.hits.sum()) for e in self._keys.values())
            gains = tuple(sorted(self._gains.items()))
            return (len(self), self.bytes_used, tuple(sorted(self._keys)), hits, gains, self._tick)

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

        Tokens whose features or Δ are not finite (or whose Δ overflows the storage dtype) are
        dropped and counted in ``rejected_nonfinite``: the pool never holds NaN or inf.
        Near-duplicates of an existing anchor are merged (count-weighted mean); the rest are
        appended. Returns the number of new anchor tokens; evicts to stay within budget.
        """
        if feats.shape[0] == 0:
            return 0
        d = delta.permute(3, 0, 1, 2, 4).to("cpu", torch.float32, copy=True)  # [N, L, 2, H, D]
        f = feats.float().cpu().numpy().astype(np.float32)
        ok = self._admissible(f, d)
        with self._lock:
            self.rejected_nonfinite += int((~ok).sum())
            if not ok.any():
                return 0
            f, d = f[ok], d[torch.from_numpy(ok)]
            self._tick += 1
            entry = self._keys.get(key)
            if entry is not None and len(entry.feats):
                dist, idx = self._search(entry, f, 1)
                dup = dist[:, 0] <= self.config.merge_distance
                for i in np.nonzero(dup)[0]:
                    self._merge(entry, int(idx[i, 0]), d[i])
                f, d = f[~dup], d[torch.from_numpy(~dup)]
            f, d = self._room_for(f, d)
            if len(f):
                self._append(key, f, d)
            self._evict_locked(self.config.budget_bytes)
            return len(f)

    def _room_for(self, f: np.ndarray, d: Tensor) -> tuple[np.ndarray, Tensor]:
        """Make room for new anchors *before* they are admitted (the budget holds at every
        instant); of more than the whole budget holds, only the first ones are kept."""
        layers, _, heads, dim = d.shape[1:]
        per = self.token_bytes(layers, heads, dim)
        fit = min(len(f), self.config.budget_bytes // per)
        self._evict_locked(self.config.budget_bytes - fit * per)
        return f[:fit], d[:fit]

    def shrink(self, target_bytes: int) -> None:
        """Evict the least useful anchors until the pool holds at most ``target_bytes``."""
        with self._lock:
            self._evict_locked(max(0, int(target_bytes)))

    def _admissible(self, f: np.ndarray, d: Tensor) -> np.ndarray:
        """[N] bool: finite features and a Δ that the storage dtype holds without overflow.

        f: [N, F]; d: [N, L, 2, H, D] float32. (NaN fails every comparison, inf the range.)
        """
        dtype = STORAGE[self.config.storage]
        limit = torch.finfo(dtype if dtype.is_floating_point else torch.float32).max
        fits = (d.flatten(1).abs().amax(1) <= limit).numpy()
        return np.isfinite(f).all(1) & fits

    def _merge(self, entry: _Key, j: int, delta: Tensor) -> None:
        """Fold ``delta`` [L, 2, H, D] into anchor j's running mean (in float64: the sum of
        admissible values cannot overflow, so the mean stays finite in the storage dtype)."""
        c = float(entry.counts[j])
        old = self._decode(entry.deltas[j : j + 1], entry.scales[j : j + 1])[0]
        mean = ((old.double() * c + delta.double()) / (c + 1)).float()
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

    def _evict_locked(self, target: int) -> None:
        """Per-key cap, then ``target`` bytes, dropping the least useful anchors first."""
        for key in list(self._keys):
            e = self._keys[key]
            if len(e.feats) > self.config.max_per_key:
                order = np.argsort(-self._usefulness(e), kind="stable")
                keep = np.zeros(len(e.feats), dtype=bool)
                keep[order[: self.config.max_per_key]] = True
                self._keep(key, keep)
        while self._keys and self.bytes_used > target:
            per_token = {k: e.nbytes / len(e.feats) for k, e in self._keys.items()}
            excess = self.bytes_used - target
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

    def count_hits(self, key: str, index: Tensor) -> None:
        """Count the anchors an estimate used (``Estimate.anchor_ids``, [N, k]) as hits."""
        with self._lock:
            entry = self._keys.get(key)
            if entry is None or index.numel() == 0 or int(index.max()) >= len(entry.hits):
                return
            np.add.at(entry.hits, index.flatten().numpy(), 1)

    def estimate(
        self, key: str, feats: Tensor, shape: tuple[int, ...], count_hits: bool = True
    ) -> Estimate:
        """Offsets for N tokens of context ``key``. feats: [N, F]; shape: (L, 2, H, D).

        count_hits: count the anchors used as hits now; a caller that must leave the pool
        unchanged until its call succeeds passes False and calls :meth:`count_hits` later.
        """
        n = feats.shape[0]
        layers, two, heads, dim = shape
        with self._lock:
            entry = self._keys.get(key)
            if entry is None or n == 0:
                inf = torch.full((n,), float("inf"))
                none = torch.zeros(n, 0, dtype=torch.long)
                zeros = torch.zeros(layers, two, heads, n, dim)
                return Estimate(zeros, inf, inf.clone(), torch.zeros(n), none)
            dist, idx = self._search(
                entry, feats.float().cpu().numpy().astype(np.float32), self.config.neighbours
            )
            if count_hits:
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
            return Estimate(delta, d[:, 0], entropy, spread, index)

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
    def save(self, path: str | Path, identity: ModelIdentity | None = None) -> None:
        """Write the pool to ``path`` atomically (format: :mod:`kvshare.anchors.persist`).

        identity: the model the anchors were observed on (``ModelIdentity.of(model)``);
        recorded so that :meth:`load` can refuse the file for another model.
        Raises StateFileError; on failure an existing file at ``path`` is untouched.
        """
        with self._lock:
            state = self._snapshot(identity)
        write_state(path, state)

    def _snapshot(self, identity: ModelIdentity | None) -> PoolState:
        """A copy of the pool's state (call with the lock held; merges mutate Δ in place)."""
        keys = {
            k: KeyTensors(
                torch.from_numpy(e.feats.copy()),
                e.deltas.clone(),
                e.scales.clone(),
                torch.from_numpy(e.counts.astype(np.float64)),
                torch.from_numpy(e.hits.astype(np.float64)),
                torch.from_numpy(e.born.astype(np.int64)),
            )
            for k, e in self._keys.items()
        }
        config = dataclasses.asdict(self.config)
        return PoolState(config, self.config.storage, self._tick, dict(self._gains), keys, identity)

    @classmethod
    def load(cls, path: str | Path, identity: ModelIdentity | None = None) -> AnchorPool:
        """Read a pool written by :meth:`save`, verifying everything before using any of it.

        identity: the model the pool will serve; a file written for another model raises
        ModelMismatchError. Any corrupt, truncated or inconsistent file raises StateFileError.
        """
        state = read_state(path, identity)
        config = build_config(AnchorConfig, state.config, str(path))
        if config.storage != state.storage:
            raise StateFileError(
                f"anchor pool file {path} is unusable: its config says storage "
                f"{config.storage!r} but its Δ are {state.storage}; delete it (the pool relearns)"
            )
        pool = cls(config)
        pool._tick = state.tick
        pool._gains = dict(state.gains)
        for k, t in state.keys.items():
            pool._keys[k] = _Key(
                t.feats.numpy(),
                t.deltas,
                t.scales,
                t.counts.numpy(),
                t.hits.numpy(),
                t.born.numpy(),
            )
        pool._check_limits(str(path))
        return pool

    def _check_limits(self, where: str) -> None:
        """A loaded pool must respect its own per-key cap and byte budget."""
        too_many = any(len(e.feats) > self.config.max_per_key for e in self._keys.values())
        if too_many or self.bytes_used > self.config.budget_bytes:
            raise StateFileError(
                f"anchor pool file {where} is unusable: it holds more anchors than its config "
                f"allows (max_per_key, budget_bytes); delete it (the pool relearns)"
            )
