"""Exact k-nearest-neighbour search over one context key's anchor features.

Two backends behind one contract (squared L2 distances, ascending, ties by lower id):
``faiss`` (a flat index on CPU, the default there) and ``torch`` (a matmul and a top-k on the
tensors' own device: the anchor estimate then never leaves the GPU). ``index_for(device)``
picks one; both are tested against each other (``tests/anchors/test_anchors.py``).
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


class TorchIndex(KNNIndex):
    """‖q‖² − 2q·f + ‖f‖² and a top-k, on the features' device (no host round trip)."""

    name = "torch"

    def __init__(self, feats: np.ndarray, device: torch.device) -> None:
        super().__init__(feats, device)
        self.feats = torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32)).to(device)
        self.sq = self.feats.pow(2).sum(1)

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        q = queries.detach().to(self.device, torch.float32)
        d = (q.pow(2).sum(1, keepdim=True) - 2 * q @ self.feats.T + self.sq).clamp_min(0)
        top = d.topk(min(k, self.size), dim=1, largest=False, sorted=True)
        return top.values, top.indices


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
