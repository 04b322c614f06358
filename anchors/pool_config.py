"""AnchorConfig: the settings of an :class:`~kvshare.anchors.pool.AnchorPool` (k of its
k-NN, merging, byte budget, Δ storage, ageing), checked when made."""

from __future__ import annotations

from dataclasses import dataclass

from kvshare.anchors.persist import STORAGE

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
