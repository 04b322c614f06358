"""Engine configuration: frozen, validated dataclasses.

``EngineConfig`` holds the mode, the sharing scope and the per-call limits, and one frozen
sub-config per part of the engine: ``store`` (:class:`StoreConfig`), ``select``
(:class:`SelectConfig`), ``anchors`` (:class:`AnchorsConfig`), ``kernels``
(:class:`KernelsConfig`) and ``tiers`` (:class:`TiersConfig`). Sub-config fields keep their
flat names, so ``engine.fork(recompute_ratio=0.2)`` and
``config.with_options(recompute_ratio=0.2)`` reach ``select.recompute_ratio`` (a name
belongs to exactly one sub-config). The sub-configs are defined in ``kvshare.config_parts``.

Wing: ``config``, between ``store`` and ``sched``. May import: the core, ``kvshare.model``
and ``kvshare.anchors``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

# Re-exported from here as before: AnchorConfig, and the sub-configs' choices (the sub-configs
# themselves are used below).
from kvshare.anchors.pool import AnchorConfig as AnchorConfig
from kvshare.config_parts import ANCHOR_INDEXES as ANCHOR_INDEXES
from kvshare.config_parts import EVICTIONS as EVICTIONS
from kvshare.config_parts import KERNEL_BACKENDS as KERNEL_BACKENDS
from kvshare.config_parts import STORAGES as STORAGES
from kvshare.config_parts import (
    AnchorsConfig,
    KernelsConfig,
    SelectConfig,
    StoreConfig,
    TiersConfig,
    set_fields,
)
from kvshare.errors import ConfigError
from kvshare.model.prompt import ROLES
from kvshare.validate import check_bool, check_choice, check_float, check_int, check_str_tuple

MODES = ("full", "prefix", "blend", "anchor", "kvshare")
IMPLEMENTED_MODES = MODES
SHARE_SCOPES = ("session", "tenant", "global")


def _names(cls: type) -> set[str]:
    return {f.name for f in fields(cls)}


_PARTS = {"store": StoreConfig, "select": SelectConfig, "anchors": AnchorsConfig}
_PARTS["kernels"] = KernelsConfig
_PARTS["tiers"] = TiersConfig


@dataclass(frozen=True)
class EngineConfig:
    """How an :class:`~kvshare.Engine` reuses KV. Fields below live on ``EngineConfig`` or
    on the sub-config that owns them (``config.select.recompute_ratio``); every one of them
    can be set by its name through :meth:`of` / :meth:`with_options` / ``Engine.fork``.

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
        causal prefill of that span is faster (measured crossover, see docs/results.md).
    min_reuse_share: reuse cached KV only when it covers at least this share of the prompt.
        Any cached past turns the fast causal attention path into an explicit-mask one (about
        +18% forward time at 1k tokens on CPU with SDPA), so a tiny hit costs more than it
        saves; below this share the call is prefilled from scratch (measured, see docs/results.md).
    recompute_ratio: ``blend``: share of relocated tokens recomputed by KV deviation.
    sink_tokens: tokens recomputed at the start of every relocated run (attention sink).
    recent_tokens: ``kvshare`` recomputes the last this many relocated tokens, the ones the
        first generated token attends to most (0: off). 8 by measurement: 32 cost 3-4 points
        of reuse on both benchmark workloads for no KL gain once runs come from the closest
        context (docs/results.md).
    check_layers: layers at which deviation is scored; all but the last keep twice the
        budget (gradual filtering), the last keeps the budget.
    target_kl, max_recompute_ratio, adaptive: ``kvshare`` starts at ``recompute_ratio``; after
        a call with ``teach=True`` it moves its ratio toward the first-token KL target, after
        any other call toward the share of relocated tokens whose deviation exceeded
        ``deviation_threshold`` (``kvshare.engine.fidelity.steer_ratio``); never above the
        cap, and not at all with ``adaptive=False``.
    deviation_threshold: ``kvshare`` also recomputes every short-listed token whose deviation
        at the last check layer exceeds this (None: the budget alone decides).
    anchor_gamma: ``anchor`` mode's KVCOMM entropy threshold (dense prefill above
        gamma·log(neighbours)). neighbours: k of the anchor k-NN estimate; 4 by measurement:
        the weighted Δ over k neighbours is memory-bound on CPU (k=8: ~0.04 s of agent 5's
        TTFT on the synthetic workload), and k=4 gave the same KL there (docs/results.md).
    feature_layer: layer of the base KV whose un-rotated keys/values are the matching feature.
    anchor_max_distance: offsets are applied only to tokens whose nearest anchor lies within
        this many τ (the key's median anchor spacing); farther estimates are not trusted.
    anchor_budget_bytes, anchor_storage: the anchor pool's byte cap and Δ storage dtype.
    idle_teach: after a call that relocated, queue a teaching job; a worker runs its full
        prefill once the model has been idle ``idle_quiet_s`` seconds and teaches the pool
        from it, giving the model back between two layers as soon as a call waits (at most
        ``idle_jobs`` wait, the least sure first; ``kvshare.engine.idle``). Off by default:
        it spends idle compute (and, on a shared CPU, cores) on learning.
    neighbours, anchor_budget_bytes and anchor_storage default to ``AnchorConfig``'s values.
        The anchor budget is one cap over the pools of every sharing scope.
    max_new_tokens_cap: the most tokens one call may ask for (``max_new_tokens`` above it is
        a ConfigError).
    batch_decode: calls that decode at the same time advance together, one batched forward
        per step (``kvshare.engine.batcher``; Llama/Qwen2/Mistral without a sliding window);
        off, or for another layout, each call decodes alone in turn slices.
    decode_every_ms: while a call prefills, the calls decoding get a step between two of its
        layers whenever they have waited this long; those steps count in the prefilling
        call's TTFT. 0 (default): a prefill runs whole and the streams wait for it — better
        TTFT and throughput for agent workflows; set it (e.g. 100) where steady streaming to
        people matters more (measured trade-off: docs/results.md, "Concurrency").
    prefill_chunk_tokens: > 0: an ordinary causal prefill (the tokens after the exact reused
        prefix, nothing relocated: every ``full`` and ``prefix`` call, a ``kvshare`` call that
        found nothing to relocate) runs inside the decode steps, this many tokens a step
        beside the decodes, in one forward (``kvshare.engine.prefills``): streams never
        stall for a whole prompt and ride on the chunk's weight reads. 0 (default): whole.
        Its KV equals a whole prefill's within float rounding, not bit for bit.
    max_decode_batch, decode_pool_bytes: the most calls one step decodes, and the bytes their
        decode KV rows may take together (prompt plus ``max_new_tokens`` each, in blocks of
        128 tokens); a call that does not fit waits for a free row, and one that would not
        fit even alone is refused before it runs (``DecodeCapacityError``).
    share_prefix_tokens: a call whose exact reused prefix is at least this many tokens
        decodes over that prefix held once (the prefix cache's own KV, not copied into its
        row), and every call decoding over the same prefix attends to it in one product
        (``kvshare.model.shared_prefix``); 0: every row copies its whole prompt.
    decode_slice: fairness where calls decode alone: a call decodes this many tokens per
        turn, then the engine serves the next waiting call (arrival order), so one long reply
        cannot hold every tenant.
    call_log_size: ``Engine.calls`` keeps the last this many CallStats; ``Engine.stats``
        totals stay exact over every call, its medians are over the kept window.
    special_token_roles: roles whose content may contain control tokens (``<|im_start|>``...)
        that are parsed as such; in every other role's content that text is plain text, so a
        user cannot forge a turn. Default: only ``system`` (the developer's own text).
    host_tier_bytes, disk_tier_dir, disk_tier_bytes, disk_write_behind_bytes, eviction,
        prefetch, pin_bytes: the tiers below the device tier and how segments move between
        them (:class:`TiersConfig`).
    kernel_backend, fixed_shapes: the kernel ops' backend and whether a gradual prefill keeps
        fixed shapes (no host read before the first token but the sampled token; ``auto``: on
        CUDA only, where a read is a device sync; :class:`KernelsConfig`).
    profile: record seconds per pipeline stage in ``CallStats.stages`` (synchronising the
        device at stage edges: for measurement, not production; ``kvshare.engine.profile``).
    """

    mode: str = "kvshare"
    share_scope: str = "tenant"
    store: StoreConfig = StoreConfig()
    select: SelectConfig = SelectConfig()
    anchors: AnchorsConfig = AnchorsConfig()
    kernels: KernelsConfig = KernelsConfig()
    tiers: TiersConfig = TiersConfig()
    max_new_tokens_cap: int = 4096
    batch_decode: bool = True
    decode_every_ms: float = 0.0
    prefill_chunk_tokens: int = 0
    max_decode_batch: int = 16
    decode_pool_bytes: int = 4 << 30
    share_prefix_tokens: int = 256
    decode_slice: int = 16
    call_log_size: int = 10_000
    special_token_roles: tuple[str, ...] = ("system",)
    profile: bool = False

    def __post_init__(self) -> None:
        """Check every field's type, finiteness and range; normalise numbers to plain types.

        Raises :class:`ConfigError` naming the field. ``feature_layer`` and ``check_layers``
        are checked against the model's layer count when the engine is built.
        """
        for name, cls in _PARTS.items():
            if not isinstance(getattr(self, name), cls):
                raise ConfigError(f"EngineConfig.{name} must be a {cls.__name__}")
        set_fields(self, {
            "mode": check_choice("mode", self.mode, MODES),
            "share_scope": check_choice("share_scope", self.share_scope, SHARE_SCOPES),
            "max_new_tokens_cap": check_int(
                "max_new_tokens_cap", self.max_new_tokens_cap, 1, 1 << 24
            ),
            "batch_decode": check_bool("batch_decode", self.batch_decode),
            "max_decode_batch": check_int("max_decode_batch", self.max_decode_batch, 1, 4096),
            "decode_every_ms": check_float("decode_every_ms", self.decode_every_ms, 0.0, 1e6),
            "prefill_chunk_tokens": check_int(
                "prefill_chunk_tokens", self.prefill_chunk_tokens, 0, 1 << 20
            ),
            "decode_pool_bytes": check_int(
                "decode_pool_bytes", self.decode_pool_bytes, 1, 1 << 50
            ),
            "share_prefix_tokens": check_int(
                "share_prefix_tokens", self.share_prefix_tokens, 0, 1 << 30
            ),
            "decode_slice": check_int("decode_slice", self.decode_slice, 1, 1 << 24),
            "call_log_size": check_int("call_log_size", self.call_log_size, 1, 1 << 24),
            "profile": check_bool("profile", self.profile),
            "special_token_roles": check_str_tuple(
                "special_token_roles", self.special_token_roles, ROLES
            ),
        })  # fmt: skip
        if self.mode not in IMPLEMENTED_MODES:
            raise ConfigError(
                f"mode {self.mode!r} is not implemented yet; available: "
                f"{', '.join(IMPLEMENTED_MODES)}"
            )

    @classmethod
    def of(cls, **options: Any) -> EngineConfig:
        """A config from flat option names (``EngineConfig.of(mode="blend", sink_tokens=8)``)."""
        return cls().with_options(**options)

    def with_options(self, **options: Any) -> EngineConfig:
        """A copy with ``options`` changed: top-level fields, whole sub-configs, or any
        sub-config field by its own name. Unknown names raise :class:`ConfigError`."""
        top = {f.name for f in fields(self)}
        routed: dict[str, dict[str, Any]] = {name: {} for name in _PARTS}
        unknown = []
        for key, value in options.items():
            part = next((p for p, c in _PARTS.items() if key in _names(c)), None)
            if key in top:
                continue
            if part is None:
                unknown.append(key)
            else:
                routed[part][key] = value
        if unknown:
            raise ConfigError(f"unknown EngineConfig option(s): {', '.join(sorted(unknown))}")
        changes = {k: v for k, v in options.items() if k in top}
        for part, values in routed.items():
            if values:
                base = changes.get(part, getattr(self, part))
                changes[part] = replace(base, **values)
        return replace(self, **changes)
