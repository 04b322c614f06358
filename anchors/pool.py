"""AnchorPool: observed, position-free KV deviations matched token by token (exact k-NN).

An anchor token records, for a token relocated from a source context into a target
context, Δ = KV_in_target_context − KV_relocated for every layer (K and V), keys un-rotated to
position 0. Anchors are grouped by context key ``source -> target`` (producing agent and slot
-> consuming agent and slot), since the deviation depends on both ends. A new token's offset
is Σ softmax(−d/τ)·Δ over its k nearest anchor tokens of the same key (d: squared L2 distance
of features, τ: the key's median nearest-neighbour distance, recalibrated on every rebuild).
Each key's storage, the Δ codec, the k-NN search and eviction live in
:mod:`kvshare.anchors.entries`. A pool lives on a device: its Δ there, and its estimate runs
there end to end (faiss on CPU, the torch index elsewhere: :mod:`kvshare.anchors.knn`).
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from kvshare.anchors.entries import (
    KeyEntry,
    admissible,
    appended,
    evict,
    from_tensors,
    merge,
    prepare,
    search,
    to_tensors,
    weighted,
)
from kvshare.anchors.knn import index_for
from kvshare.anchors.persist import (
    STORAGE,
    ModelIdentity,
    PoolState,
    build_config,
    read_state,
    write_state,
)
from kvshare.anchors.pool_config import AnchorConfig
from torch import Tensor

from kvshare.errors import StateFileError


class Estimate(NamedTuple):
    """delta: [L, 2, H, N, D] float32 position-free offsets (zeros where nothing matched; a
    strided view of the [N, L·2·H·D] reduction, head dims innermost).
    distance: [N] nearest-anchor distance / τ (inf when the key has no anchors).
    entropy: [N] entropy of the softmax weights over the neighbours.
    spread: [N] weighted std of the neighbours' Δ norms, relative to their mean.
    anchor_ids: [N, k] long: the anchors used (``count_hits`` takes it; [N, 0] if none)."""

    delta: Tensor
    distance: Tensor
    entropy: Tensor
    spread: Tensor
    anchor_ids: Tensor = torch.zeros(0, 0, dtype=torch.long)


class AnchorPool:
    """Thread-safe pool of anchors; see the module docstring for the estimate."""

    def __init__(
        self,
        config: AnchorConfig | None = None,
        device: torch.device | str = "cpu",
        index: str = "auto",
    ) -> None:
        """device: where Δ is kept and estimates are computed; index: ``faiss``, ``torch``
        or ``auto`` (faiss on CPU when installed, torch elsewhere)."""
        self.config = config or AnchorConfig()
        self.device = torch.device(device)
        self.index_kind = index_for(self.device, index)
        self._keys: dict[str, KeyEntry] = {}
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

    def gains(self) -> dict[str, tuple[float, float]]:
        """The keys whose estimates calls have checked, with their running (K, V) gains."""
        with self._lock:
            return dict(self._gains)

    def record_gain(self, key: str, gain_k: float, gain_v: float, rate: float = 0.3) -> None:
        """Fold one call's fitted gains (each in [0, 1]) into the key's running mean."""
        with self._lock:
            old_k, old_v = self._gains.get(key, (gain_k, gain_v))
            self._gains[key] = (
                (1 - rate) * old_k + rate * gain_k,
                (1 - rate) * old_v + rate * gain_v,
            )

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
        dtype = STORAGE[self.config.storage]
        ok = admissible(f, d, dtype)
        with self._lock:
            self.rejected_nonfinite += int((~ok).sum())
            if not ok.any():
                return 0
            f, d = f[ok], d[torch.from_numpy(ok)]
            self._tick += 1
            entry = self._keys.get(key)
            if entry is not None and len(entry.feats):
                found = search(entry, torch.from_numpy(f), 1, self.index_kind, self.device)
                dist, idx = (t.cpu().numpy() for t in found)
                dup = dist[:, 0] <= self.config.merge_distance
                for i in np.nonzero(dup)[0]:
                    merge(entry, int(idx[i, 0]), d[i], dtype, self._tick)
                f, d = f[~dup], d[torch.from_numpy(~dup)]
            f, d = self._room_for(f, d)
            if len(f):
                old = self._keys.get(key)
                self._keys[key] = appended(old, f, d, dtype, self._tick, self.device)
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

    def _evict_locked(self, target: int) -> None:
        """Per-key cap, then ``target`` bytes, dropping the least useful anchors first."""
        cfg = self.config
        self.evicted += evict(self._keys, target, cfg.max_per_key, self._tick, cfg.age_weight)
        self._prepare_locked()

    def _prepare_locked(self) -> None:
        """Every changed key's index built now (learning, loading, eviction: after a call's
        first token), so the estimates on the path to a first token never build one."""
        for entry in self._keys.values():
            prepare(entry, self.index_kind, self.device)

    # ------------------------------------------------------------------ estimation
    def count_hits(self, key: str, index: Tensor) -> None:
        """Count the anchors an estimate used (``Estimate.anchor_ids``, [N, k]) as hits."""
        with self._lock:
            entry = self._keys.get(key)
            if entry is None or index.numel() == 0 or int(index.max()) >= len(entry.hits):
                return
            np.add.at(entry.hits, index.flatten().cpu().numpy(), 1)

    def estimate(
        self, key: str, feats: Tensor, shape: tuple[int, ...], count_hits: bool = True
    ) -> Estimate:
        """Offsets for N tokens of context ``key``. feats: [N, F]; shape: (L, 2, H, D).
        Every tensor of the estimate is on the pool's device.

        count_hits: count the anchors used as hits now; a caller that must leave the pool
        unchanged until its call succeeds passes False and calls :meth:`count_hits` later.
        """
        n = feats.shape[0]
        layers, two, heads, dim = shape
        with self._lock:
            entry = self._keys.get(key)
            if entry is None or n == 0:
                dev = self.device
                inf = torch.full((n,), float("inf"), device=dev)
                none = torch.zeros(n, 0, dtype=torch.long, device=dev)
                zeros = torch.zeros(layers, two, heads, n, dim, device=dev)
                return Estimate(zeros, inf, inf.clone(), torch.zeros(n, device=dev), none)
            k = self.config.neighbours
            dist, index = search(entry, feats, k, self.index_kind, self.device)
            if count_hits:
                np.add.at(entry.hits, index.flatten().cpu().numpy(), 1)
            d = dist / entry.tau
            w = torch.softmax(-d, dim=1)  # [N, k]
            delta = weighted(entry, index, w)
            norms = entry.norms[index]  # [N, k]
            mean = (w * norms).sum(1)
            spread = (w * (norms - mean[:, None]) ** 2).sum(1).sqrt() / mean.clamp_min(1e-8)
            entropy = -(w * w.clamp_min(1e-12).log()).sum(1)
            delta = delta.view(n, layers, two, heads, dim).permute(1, 2, 3, 0, 4)  # a view
            return Estimate(delta, d[:, 0], entropy, spread, index)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path, identity: ModelIdentity | None = None) -> None:
        """Write the pool to ``path`` atomically (format: :mod:`kvshare.anchors.persist`).

        identity: the model the anchors were observed on (``ModelIdentity.of(model)``), so
        :meth:`load` refuses the file for another. StateFileError: ``path`` left untouched.
        """
        write_state(path, self.state(identity))

    tick = property(lambda self: self._tick, doc="Observations so far (grows on each change).")

    def state(self, identity: ModelIdentity | None = None) -> PoolState:
        """A copy of the pool's state, as :meth:`save` writes it (under the lock: merges
        mutate Δ in place); its ``tick`` grows on every change."""
        with self._lock:
            keys = {k: to_tensors(e) for k, e in self._keys.items()}
            config, gains = dataclasses.asdict(self.config), dict(self._gains)
            return PoolState(config, self.config.storage, self._tick, gains, keys, identity)

    @classmethod
    def load(
        cls,
        path: str | Path,
        identity: ModelIdentity | None = None,
        device: torch.device | str = "cpu",
        index: str = "auto",
    ) -> AnchorPool:
        """Read a pool written by :meth:`save` (onto ``device``), verifying all of it first.
        identity: the model the pool will serve; a file written for another model raises
        ModelMismatchError. Any corrupt, truncated or inconsistent file raises StateFileError.
        """
        return cls.from_state(read_state(path, identity), str(path), device, index)

    @classmethod
    def from_state(
        cls, state: PoolState, where: str, device: torch.device | str = "cpu", index: str = "auto"
    ) -> AnchorPool:
        """The pool of a verified ``state`` read from ``where`` (:meth:`load`'s second half)."""
        config = build_config(AnchorConfig, state.config, where)
        if config.storage != state.storage:
            raise StateFileError(
                f"anchor pool file {where} is unusable: its config says storage "
                f"{config.storage!r} but its Δ are {state.storage}; delete it (the pool relearns)"
            )
        pool = cls(config, device, index)
        pool._tick = state.tick
        pool._gains = dict(state.gains)
        for k, t in state.keys.items():
            pool._keys[k] = from_tensors(t, pool.device)
        pool._check_limits(where)
        with pool._lock:
            pool._prepare_locked()
        return pool

    def _check_limits(self, where: str) -> None:
        """A loaded pool must respect its own per-key cap and byte budget."""
        too_many = any(len(e.feats) > self.config.max_per_key for e in self._keys.values())
        if too_many or self.bytes_used > self.config.budget_bytes:
            raise StateFileError(
                f"anchor pool file {where} is unusable: it holds more anchors than its config "
                f"allows (max_per_key, budget_bytes); delete it (the pool relearns)"
            )
