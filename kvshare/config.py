"""Engine configuration: a frozen dataclass validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from kvshare.anchors.pool import AnchorConfig
from kvshare.errors import ConfigError

MODES = ("full", "prefix", "blend", "anchor", "kvshare")
IMPLEMENTED_MODES = MODES
RELOCATING_MODES = ("blend", "anchor", "kvshare")
ANCHORED_MODES = ("anchor", "kvshare")
SHARE_SCOPES = ("session", "tenant", "global")


@dataclass(frozen=True)
class EngineConfig:
    """How an :class:`~kvshare.Engine` reuses KV.

    mode: ``full`` (prefill everything, the oracle), ``prefix`` (exact longest-prefix reuse,
        what vLLM/SGLang do), ``blend`` (relocation + deviation-selected recompute), ``anchor``
        (relocation + anchor offsets, KVCOMM's all-or-nothing fallback) or ``kvshare``
        (relocation + anchor offsets + sink and deviation recompute, adaptive budget).
    share_scope: who may reuse whose KV: ``session``, ``tenant`` (default) or ``global``.
        KV never crosses tenants unless ``global`` is chosen explicitly.
    prefix_cache_bytes: byte budget of the token-level radix tree (``prefix`` mode).
    segment_store_bytes: byte budget of the content-addressed segment store.
    store_segments: keep every computed message segment and reply in the segment store.
    masked_prefill_max_ratio: a masked partial prefill is used while the recomputed share of the
        span it would otherwise re-run stays at or below this ratio; above it an ordinary
        causal prefill of that span is faster (measured crossover, see README).
    min_reuse_share: reuse cached KV only when it covers at least this share of the prompt.
        Any cached past turns the fast causal attention path into an explicit-mask one (about
        +18% forward time at 1k tokens on CPU with SDPA), so a tiny hit costs more than it
        saves; below this share the call is prefilled from scratch (measured, see README).
    recompute_ratio: ``blend``: share of relocated tokens recomputed by KV deviation.
    sink_tokens: tokens recomputed at the start of every relocated run (attention sink).
    recent_tokens: ``kvshare`` recomputes the last this many relocated tokens, the ones the
        first generated token attends to most (0: off). 8 by measurement: 32 cost 3-4 points
        of reuse on both benchmark workloads for no KL gain once runs come from the closest
        context (README).
    check_layers: layers at which deviation is scored; all but the last keep twice the
        budget (gradual filtering), the last keeps the budget.
    target_kl, max_recompute_ratio: ``kvshare`` starts at ``recompute_ratio`` and, after every
        shadowed call, moves its ratio toward the first-token KL target, never above the cap.
    deviation_threshold: ``kvshare`` also recomputes every short-listed token whose deviation
        at the last check layer exceeds this (None: the budget alone decides).
    anchor_gamma: ``anchor`` mode's KVCOMM entropy threshold (dense prefill above
        gamma·log(neighbours)). neighbours: k of the anchor k-NN estimate; 4 by measurement:
        the weighted Δ over k neighbours is memory-bound on CPU (k=8: ~0.04 s of agent 5's
        TTFT on the synthetic workload), and k=4 gave the same KL there (README).
    feature_layer: layer of the base KV whose un-rotated keys/values are the matching feature.
    anchor_max_distance: offsets are applied only to tokens whose nearest anchor lies within
        this many τ (the key's median anchor spacing); farther estimates are not trusted.
    anchor_budget_bytes, anchor_storage: the anchor pool's byte cap and Δ storage dtype.
    neighbours, anchor_budget_bytes and anchor_storage default to ``AnchorConfig``'s values.
    """

    mode: str = "kvshare"
    share_scope: str = "tenant"
    prefix_cache_bytes: int = 2 << 30
    segment_store_bytes: int = 1 << 30
    store_segments: bool = True
    masked_prefill_max_ratio: float = 0.9
    min_reuse_share: float = 0.15
    recompute_ratio: float = 0.15
    sink_tokens: int = 4
    recent_tokens: int = 8
    check_layers: tuple[int, ...] = (1, 4)
    target_kl: float = 0.02
    adaptive: bool = True
    max_recompute_ratio: float = 0.5
    deviation_threshold: float | None = 0.1
    anchor_gamma: float = 0.3
    neighbours: int = AnchorConfig.neighbours
    feature_layer: int = 1
    anchor_max_distance: float = 4.0
    anchor_budget_bytes: int = AnchorConfig.budget_bytes
    anchor_storage: str = AnchorConfig.storage

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.mode not in IMPLEMENTED_MODES:
            raise ConfigError(
                f"mode {self.mode!r} is not implemented yet; available: "
                f"{', '.join(IMPLEMENTED_MODES)}"
            )
        if self.share_scope not in SHARE_SCOPES:
            raise ConfigError(
                f"unknown share_scope {self.share_scope!r}; choose one of {', '.join(SHARE_SCOPES)}"
            )
        for name in ("prefix_cache_bytes", "segment_store_bytes"):
            if int(getattr(self, name)) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.min_reuse_share <= 1.0:
            raise ConfigError(f"min_reuse_share must be in [0, 1], got {self.min_reuse_share}")
        if not 0.0 <= self.recompute_ratio <= 1.0:
            raise ConfigError(f"recompute_ratio must be in [0, 1], got {self.recompute_ratio}")
        if self.sink_tokens < 0 or self.recent_tokens < 0:
            raise ConfigError("sink_tokens and recent_tokens must be >= 0")
        if (
            not self.check_layers
            or any(c < 0 for c in self.check_layers)
            or list(self.check_layers) != sorted(self.check_layers)
        ):
            raise ConfigError(
                f"check_layers must be ascending layer indices, got {self.check_layers}"
            )
        if not self.target_kl > 0.0 or not 0.0 <= self.max_recompute_ratio <= 1.0:
            raise ConfigError("target_kl must be > 0 and max_recompute_ratio in [0, 1]")
        if self.deviation_threshold is not None and self.deviation_threshold < 0:
            raise ConfigError(f"deviation_threshold must be >= 0, got {self.deviation_threshold}")
        if self.neighbours < 1 or self.feature_layer < 0 or self.anchor_max_distance <= 0:
            raise ConfigError("neighbours >= 1, feature_layer >= 0, anchor_max_distance > 0")
        if not 0.0 <= self.masked_prefill_max_ratio <= 1.0:
            raise ConfigError(
                f"masked_prefill_max_ratio must be in [0, 1], got {self.masked_prefill_max_ratio}"
            )

    def with_options(self, **options: Any) -> EngineConfig:
        """A copy with ``options`` changed; unknown option names raise :class:`ConfigError`."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"unknown EngineConfig option(s): {', '.join(unknown)}")
        return replace(self, **options)
