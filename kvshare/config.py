"""Engine configuration: a frozen dataclass validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from kvshare.anchors.pool import AnchorConfig
from kvshare.errors import ConfigError
from kvshare.prompt import ROLES
from kvshare.validate import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_str_tuple,
)

MODES = ("full", "prefix", "blend", "anchor", "kvshare")
IMPLEMENTED_MODES = MODES
SHARE_SCOPES = ("session", "tenant", "global")
STORAGES = ("float32", "float16", "int8")


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
        The anchor budget is one cap over the pools of every sharing scope.
    max_new_tokens_cap: the most tokens one call may ask for (``max_new_tokens`` above it is
        a ConfigError).
    decode_slice: fairness: a call decodes this many tokens per turn, then the engine serves
        the next waiting call (arrival order), so one long reply cannot hold every tenant.
    call_log_size: ``Engine.calls`` keeps the last this many CallStats; ``Engine.stats``
        totals stay exact over every call, its medians are over the kept window.
    special_token_roles: roles whose content may contain control tokens (``<|im_start|>``...)
        that are parsed as such; in every other role's content that text is plain text, so a
        user cannot forge a turn. Default: only ``system`` (the developer's own text).
    profile: record seconds per pipeline stage in ``CallStats.stages`` (synchronising the
        device at stage edges: for measurement, not production; ``kvshare.profile``).
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
    max_new_tokens_cap: int = 4096
    decode_slice: int = 16
    call_log_size: int = 10_000
    special_token_roles: tuple[str, ...] = ("system",)
    profile: bool = False

    def __post_init__(self) -> None:
        """Check every field's type, finiteness and range; normalise numbers to plain types.

        Raises :class:`ConfigError` naming the field. ``feature_layer`` and ``check_layers``
        are checked against the model's layer count when the engine is built.
        """
        for name, value in _checked(self).items():
            object.__setattr__(self, name, value)
        if self.mode not in IMPLEMENTED_MODES:
            raise ConfigError(
                f"mode {self.mode!r} is not implemented yet; available: "
                f"{', '.join(IMPLEMENTED_MODES)}"
            )

    def with_options(self, **options: Any) -> EngineConfig:
        """A copy with ``options`` changed; unknown option names raise :class:`ConfigError`."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"unknown EngineConfig option(s): {', '.join(unknown)}")
        return replace(self, **options)


_BYTES_MAX = 1 << 50


def _checked(c: EngineConfig) -> dict[str, Any]:
    """Every field of ``c`` checked and normalised (raises ConfigError)."""
    if not isinstance(c.check_layers, (list, tuple)) or not c.check_layers:
        raise ConfigError(f"check_layers must be a non-empty tuple of ints, got {c.check_layers!r}")
    layers = tuple(check_int("check_layers", x, 0) for x in c.check_layers)
    if list(layers) != sorted(set(layers)):
        raise ConfigError(f"check_layers must be ascending layer indices, got {c.check_layers}")
    threshold = c.deviation_threshold
    return {
        "mode": check_choice("mode", c.mode, MODES),
        "share_scope": check_choice("share_scope", c.share_scope, SHARE_SCOPES),
        "prefix_cache_bytes": check_int("prefix_cache_bytes", c.prefix_cache_bytes, 0, _BYTES_MAX),
        "segment_store_bytes": check_int(
            "segment_store_bytes", c.segment_store_bytes, 0, _BYTES_MAX
        ),
        "store_segments": check_bool("store_segments", c.store_segments),
        "masked_prefill_max_ratio": check_float(
            "masked_prefill_max_ratio", c.masked_prefill_max_ratio, 0.0, 1.0
        ),
        "min_reuse_share": check_float("min_reuse_share", c.min_reuse_share, 0.0, 1.0),
        "recompute_ratio": check_float("recompute_ratio", c.recompute_ratio, 0.0, 1.0),
        "sink_tokens": check_int("sink_tokens", c.sink_tokens, 0, 1 << 20),
        "recent_tokens": check_int("recent_tokens", c.recent_tokens, 0, 1 << 20),
        "check_layers": layers,
        "target_kl": check_float("target_kl", c.target_kl, 0.0, open_lo=True),
        "adaptive": check_bool("adaptive", c.adaptive),
        "max_recompute_ratio": check_float("max_recompute_ratio", c.max_recompute_ratio, 0, 1),
        "deviation_threshold": None
        if threshold is None
        else check_float("deviation_threshold", threshold, 0.0),
        "anchor_gamma": check_float("anchor_gamma", c.anchor_gamma, 0.0),
        "neighbours": check_int("neighbours", c.neighbours, 1, 1024),
        "feature_layer": check_int("feature_layer", c.feature_layer, 0, 1 << 16),
        "anchor_max_distance": check_float(
            "anchor_max_distance", c.anchor_max_distance, 0.0, open_lo=True
        ),
        "anchor_budget_bytes": check_int(
            "anchor_budget_bytes", c.anchor_budget_bytes, 0, _BYTES_MAX
        ),
        "anchor_storage": check_choice("anchor_storage", c.anchor_storage, STORAGES),
        "max_new_tokens_cap": check_int("max_new_tokens_cap", c.max_new_tokens_cap, 1, 1 << 24),
        "decode_slice": check_int("decode_slice", c.decode_slice, 1, 1 << 24),
        "call_log_size": check_int("call_log_size", c.call_log_size, 1, 1 << 24),
        "profile": check_bool("profile", c.profile),
        "special_token_roles": check_str_tuple("special_token_roles", c.special_token_roles, ROLES),
    }
