"""The hot-path tensor ops behind the kernels registry: one contract, a torch reference and
optional Triton kernels (``kernels.backends`` picks one per device; ``KVSHARE_KERNELS``).

Shape glossary: L layers, H kv heads, S tokens, D head dim, N tokens of a run, M anchors,
k neighbours, F = L·2·H·D values of one anchor's Δ.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from kvshare.kernels.kv import KV
from torch import Tensor, nn


@dataclass(frozen=True)
class Move:
    """What one :meth:`KernelOps.relocate` writes: slots ``[at, at + n)`` of the destination.

    src: KV [L, H, S', D] (any float dtype) whose tokens ``[src_start, src_start + n)`` go
    into the slots, keys re-rotated by ``at - src_start`` positions (the model's rotary
    parameters, scaling variants included); None: the slots keep what they hold.
    offsets: position-free Δ, KV [L, H, n, D] (any float dtype): keys get ``gains[0]·Δk``
    rotated to the slots' positions (slot i is position i), values ``gains[1]·Δv``; a gain
    is a float or a 0-dim tensor on the device (a gain fitted there is never read back).
    """

    at: int
    n: int
    src: KV | None = None
    src_start: int = 0
    offsets: KV | None = None
    gains: tuple[float | Tensor, float | Tensor] = (1.0, 1.0)


class KernelOps(ABC):
    """The ops every backend implements; a backend's results match :class:`TorchOps` within
    the rounding of the storage dtype (tests: ``tests/kernels/test_kernel_ops.py``)."""

    name: ClassVar[str]

    @abstractmethod
    def relocate(self, dst: KV, move: Move, rotary: nn.Module) -> None:
        """Write ``move`` into ``dst`` [L, H, S, D] in place, in one pass over the data."""

    @abstractmethod
    def deviation(self, fresh: KV, before: KV, index: Tensor | None = None) -> Tensor:
        """Per-token ‖ΔK‖/‖K‖ + ‖ΔV‖/‖V‖ (norms over heads and dims, float32).

        fresh, before: KV [1, H, S, D] of one layer; index: [N] long token indices (default
        all). Returns [N] float32.
        """

    @abstractmethod
    def weighted_delta(self, deltas: Tensor, scales: Tensor, index: Tensor, w: Tensor) -> Tensor:
        """Σ_j w[:, j]·scales[index[:, j]]·Δ[index[:, j]] as [N, F] float32.

        deltas: [M, F] stored Δ (float32/bf16/fp16, or int8 with per-anchor ``scales`` [M]
        float32; float storage has scales 1); index: [N, k] long; w: [N, k] float32.
        """

    def deviation_topk(self, fresh: KV, before: KV, index: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """(scores [N], positions in ``index`` of the k largest, [min(k, N)]) in one pass of
        scoring and one top-k (no host sync)."""
        scores = self.deviation(fresh, before, index)
        return scores, scores.topk(min(k, scores.numel())).indices
