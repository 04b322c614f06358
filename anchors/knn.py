"""Exact k-nearest-neighbour search over one context key's anchor features.

Two backends behind one contract (squared L2 distances, ascending, ties by lower id):
``faiss`` (a flat index on CPU, the default there) and ``torch`` (a matmul and a top-k on the
tensors' own device: the anchor estimate then never leaves the GPU). ``index_for(device)``
picks one; both are tested against each other (``tests/anchors/test_anchors.py``).

An index follows its key's anchors in place: ``append`` adds rows at the end, ``keep`` drops
rows (eviction), so learning never rebuilds one (the torch index grows a device buffer by
doubling and compacts it on the device).
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod

import numpy as np
import torch
from torch import Tensor

from kvshare.registry import Registry


class KNNIndex(ABC):
    """Exact k-NN over M features [M, F] float32; searches return tensors on ``device``."""

    name: str

    def __init__(self, feats: np.ndarray, device: torch.device) -> None:
        self.device = device
        self.size = len(feats)

    @abstractmethod
    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """(squared L2 distances [N, k'] float32, ids [N, k'] long), nearest first, with
        k' = min(k, M); queries: [N, F] on any device."""

    @abstractmethod
    def append(self, feats: np.ndarray) -> None:
        """Add N rows [N, F] after the M there are (their ids: M..M+N-1)."""

    @abstractmethod
    def keep(self, mask: np.ndarray) -> None:
        """Keep the rows where ``mask`` [M] bool is True, in order (ids renumbered 0..)."""


class FaissIndex(KNNIndex):
    """faiss ``IndexFlatL2`` (CPU)."""

    name = "faiss"

    def __init__(self, feats: np.ndarray, device: torch.device) -> None:
        import faiss  # lazy: only needed once anchors exist

        super().__init__(feats, device)
        self.index = faiss.IndexFlatL2(feats.shape[1])
        self.index.add(np.ascontiguousarray(feats, dtype=np.float32))

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        q = queries.detach().float().cpu().numpy()
        dist, idx = self.index.search(q, min(k, self.size))
        return torch.from_numpy(dist).to(self.device), torch.from_numpy(idx).to(self.device)

    def append(self, feats: np.ndarray) -> None:
        self.index.add(np.ascontiguousarray(feats, dtype=np.float32))
        self.size += len(feats)

    def keep(self, mask: np.ndarray) -> None:
        import faiss

        drop = np.flatnonzero(~mask).astype(np.int64)
        self.index.remove_ids(faiss.IDSelectorBatch(drop))  # a flat index shifts the rest down
        self.size -= len(drop)


class TorchIndex(KNNIndex):
    """‖q‖² − 2q·f + ‖f‖² and a top-k, on the features' device (no host round trip)."""

    name = "torch"

    def __init__(self, feats: np.ndarray, device: torch.device) -> None:
        super().__init__(feats, device)
        self.buffer = torch.empty(max(1, self.size), feats.shape[1], device=device)
        self.sq_buffer = torch.empty(len(self.buffer), device=device)
        self.size = 0
        self.append(feats)

    @property
    def feats(self) -> Tensor:
        """[M, F] float32 on the device (a view of the buffer)."""
        return self.buffer[: self.size]

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        q = queries.detach().to(self.device, torch.float32)
        sq = self.sq_buffer[: self.size]
        d = (q.pow(2).sum(1, keepdim=True) - 2 * q @ self.feats.T + sq).clamp_min(0)
        top = d.topk(min(k, self.size), dim=1, largest=False, sorted=True)
        return top.values, top.indices

    def append(self, feats: np.ndarray) -> None:
        """Copies the rows over without blocking (pinned on CUDA); the buffer doubles when
        full (amortised O(1) per row)."""
        rows = torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32))
        end = self.size + len(rows)
        if end > len(self.buffer):
            grown = self.buffer.new_empty(max(end, 2 * len(self.buffer)), self.buffer.shape[1])
            grown[: self.size] = self.feats
            sq = self.sq_buffer.new_empty(len(grown))
            sq[: self.size] = self.sq_buffer[: self.size]
            self.buffer, self.sq_buffer = grown, sq
        if self.device.type == "cuda":
            rows = rows.pin_memory()
        new = self.buffer[self.size : end]
        new.copy_(rows, non_blocking=True)
        self.sq_buffer[self.size : end] = new.pow(2).sum(1)
        self.size = end

    def keep(self, mask: np.ndarray) -> None:
        """Compacts the buffer on the device (the ids' copy does not block)."""
        rows = torch.from_numpy(np.flatnonzero(mask))
        if self.device.type == "cuda":
            rows = rows.pin_memory()
        rows = rows.to(self.device, non_blocking=True)
        kept = len(rows)
        self.buffer[:kept] = self.buffer.index_select(0, rows)
        self.sq_buffer[:kept] = self.sq_buffer.index_select(0, rows)
        self.size = kept


INDEXES: Registry[type[KNNIndex]] = Registry("k-NN index")
INDEXES.register("faiss", lambda: FaissIndex)
INDEXES.register("torch", lambda: TorchIndex)


def index_for(device: torch.device | str, name: str = "auto") -> type[KNNIndex]:
    """``name`` (``faiss``/``torch``), or by device: faiss on CPU when installed, else torch."""
    device = torch.device(device)
    if name == "auto":
        cpu = device.type == "cpu" and importlib.util.find_spec("faiss") is not None
        name = "faiss" if cpu else "torch"
    return INDEXES.create(name)
