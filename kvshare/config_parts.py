"""The engine's sub-configs, one per part (frozen, validated): what is kept (:class:`StoreConfig`),
which tokens are recomputed (:class:`SelectConfig`), anchor offsets (:class:`AnchorsConfig`),
kernels (:class:`KernelsConfig`) and the tiers below the device (:class:`TiersConfig`).
:class:`kvshare.config.EngineConfig` holds one of each.

Wing: ``config`` (see ``kvshare.config``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvshare.anchors.pool import AnchorConfig
from kvshare.errors import ConfigError
from kvshare.validate import check_bool, check_choice, check_float, check_int

STORAGES = ("float32", "float16", "int8")
KERNEL_BACKENDS = ("auto", "torch", "triton")
ANCHOR_INDEXES = ("auto", "faiss", "torch")
BYTES_MAX = 1 << 50


def set_fields(obj: object, values: dict[str, Any]) -> None:
    """Store checked, normalised values on a frozen dataclass instance."""
    for name, value in values.items():
        object.__setattr__(obj, name, value)


@dataclass(frozen=True)
class StoreConfig:
    """What the engine keeps. prefix_cache_bytes: byte budget of the token radix tree;
    segment_store_bytes: of the trace store; store_segments: keep every call's trace (the
    relocating modes' source of runs); min_reuse_share: reuse cached KV only when it covers
    at least this share of the prompt (any cached past turns the fast causal attention path
    into an explicit-mask one, so a sliver costs more than it saves; measured, docs/results.md)."""

    prefix_cache_bytes: int = 2 << 30
    segment_store_bytes: int = 1 << 30
    store_segments: bool = True
    min_reuse_share: float = 0.15

    def __post_init__(self) -> None:
        set_fields(self, {
            "prefix_cache_bytes": check_int(
                "prefix_cache_bytes", self.prefix_cache_bytes, 0, BYTES_MAX
            ),
            "segment_store_bytes": check_int(
                "segment_store_bytes", self.segment_store_bytes, 0, BYTES_MAX
            ),
            "store_segments": check_bool("store_segments", self.store_segments),
            "min_reuse_share": check_float("min_reuse_share", self.min_reuse_share, 0.0, 1.0),
        })  # fmt: skip


@dataclass(frozen=True)
class SelectConfig:
    """Which tokens are recomputed (fields: see :class:`~kvshare.config.EngineConfig`)."""

    masked_prefill_max_ratio: float = 0.9
    recompute_ratio: float = 0.15
    sink_tokens: int = 4
    recent_tokens: int = 8
    check_layers: tuple[int, ...] = (1, 4)
    target_kl: float = 0.02
    adaptive: bool = True
    max_recompute_ratio: float = 0.5
    deviation_threshold: float | None = 0.1

    def __post_init__(self) -> None:
        layers = self.check_layers
        if not isinstance(layers, (list, tuple)) or not layers:
            raise ConfigError(f"check_layers must be a non-empty tuple of ints, got {layers!r}")
        checked = tuple(check_int("check_layers", x, 0) for x in layers)
        if list(checked) != sorted(set(checked)):
            raise ConfigError(f"check_layers must be ascending layer indices, got {layers}")
        thr = self.deviation_threshold
        set_fields(self, {
            "masked_prefill_max_ratio": check_float(
                "masked_prefill_max_ratio", self.masked_prefill_max_ratio, 0.0, 1.0
            ),
            "recompute_ratio": check_float("recompute_ratio", self.recompute_ratio, 0.0, 1.0),
            "sink_tokens": check_int("sink_tokens", self.sink_tokens, 0, 1 << 20),
            "recent_tokens": check_int("recent_tokens", self.recent_tokens, 0, 1 << 20),
            "check_layers": checked,
            "target_kl": check_float("target_kl", self.target_kl, 0.0, open_lo=True),
            "adaptive": check_bool("adaptive", self.adaptive),
            "max_recompute_ratio": check_float(
                "max_recompute_ratio", self.max_recompute_ratio, 0, 1
            ),
            "deviation_threshold": None if thr is None else check_float(
                "deviation_threshold", thr, 0.0
            ),
        })  # fmt: skip


@dataclass(frozen=True)
class AnchorsConfig:
    """Anchor offsets (fields: see :class:`~kvshare.config.EngineConfig`); ``pool`` is the per-scope
    pools' :class:`~kvshare.anchors.AnchorConfig`. anchor_index: the pools' exact k-NN
    (``auto``: faiss on CPU when installed, torch elsewhere; ``kvshare.anchors.knn``).
    idle_teach, idle_quiet_s, idle_jobs: idle-time teaching (``kvshare.engine.idle``)."""

    anchor_gamma: float = 0.3
    neighbours: int = AnchorConfig.neighbours
    feature_layer: int = 1
    anchor_max_distance: float = 4.0
    anchor_budget_bytes: int = AnchorConfig.budget_bytes
    anchor_storage: str = AnchorConfig.storage
    anchor_index: str = "auto"
    idle_teach: bool = False
    idle_quiet_s: float = 0.05
    idle_jobs: int = 4

    def __post_init__(self) -> None:
        set_fields(self, {
            "anchor_index": check_choice("anchor_index", self.anchor_index, ANCHOR_INDEXES),
            "idle_teach": check_bool("idle_teach", self.idle_teach),
            "idle_quiet_s": check_float("idle_quiet_s", self.idle_quiet_s, 0.0, 3600.0),
            "idle_jobs": check_int("idle_jobs", self.idle_jobs, 1, 1024),
            "anchor_gamma": check_float("anchor_gamma", self.anchor_gamma, 0.0),
            "neighbours": check_int("neighbours", self.neighbours, 1, 1024),
            "feature_layer": check_int("feature_layer", self.feature_layer, 0, 1 << 16),
            "anchor_max_distance": check_float(
                "anchor_max_distance", self.anchor_max_distance, 0.0, open_lo=True
            ),
            "anchor_budget_bytes": check_int(
                "anchor_budget_bytes", self.anchor_budget_bytes, 0, BYTES_MAX
            ),
            "anchor_storage": check_choice("anchor_storage", self.anchor_storage, STORAGES),
        })  # fmt: skip

    @property
    def pool(self) -> AnchorConfig:
        return AnchorConfig(
            neighbours=self.neighbours,
            budget_bytes=self.anchor_budget_bytes,
            storage=self.anchor_storage,
        )


FIXED_SHAPES = ("auto", "on", "off")


@dataclass(frozen=True)
class KernelsConfig:
    """kernel_backend: ``auto`` (``KVSHARE_KERNELS`` if set, else Triton on CUDA when
    installed, else torch), ``torch`` or ``triton`` (``kvshare.kernels.backends``).
    fixed_shapes: a gradual prefill never reads a token count from the device (``on``: the
    deviation threshold's set is carried on at full size instead of compacted; more
    arithmetic, no host sync), or compacts it after one read (``off``: the cheaper choice
    where a read costs nothing, the CPU); ``auto``: ``on`` on CUDA, ``off`` elsewhere."""

    kernel_backend: str = "auto"
    fixed_shapes: str = "auto"

    def __post_init__(self) -> None:
        set_fields(self, {
            "kernel_backend": check_choice("kernel_backend", self.kernel_backend, KERNEL_BACKENDS),
            "fixed_shapes": check_choice("fixed_shapes", self.fixed_shapes, FIXED_SHAPES),
        })  # fmt: skip

    def fixed_for(self, device: Any) -> bool:
        """Whether calls on ``device`` (a torch.device) keep fixed shapes."""
        if self.fixed_shapes == "auto":
            return bool(device.type == "cuda")
        return self.fixed_shapes == "on"


EVICTIONS = ("workflow", "lru")


@dataclass(frozen=True)
class TiersConfig:
    """Where traces go when the device tier (``segment_store_bytes``) is full
    (``kvshare.store.tiered``). host_tier_bytes: a host-memory tier (pinned on CUDA; 0: none);
    disk_tier_dir, disk_tier_bytes: a disk tier that survives restarts (None: none);
    eviction: ``workflow`` (segments of the agents that run soonest stay up, by the
    steps-to-execution ``Engine.hint`` and wrapped workflows give; LRU breaks ties and is
    all there is without hints) or ``lru``; prefetch: on a hint, promote the next agents'
    segments in the background; pin_bytes: cap on shared prefixes (segments used by several
    agents) kept on the device tier whatever their priority; disk_write_behind_bytes: bytes
    of demotions to the disk tier that a writer thread may still be writing (their KV held in
    memory meanwhile) instead of the caller (0: the caller writes; ``kvshare.store.disk``);
    used when the model runs on an accelerator (on CPU the writer would take the model's
    cores: the caller writes, after its reply); disk_key_file: the secret that seals the disk
    tier's files (``kvshare.store.seal``; None: ``<disk_tier_dir>/kvshare.key``, created on first
    use, owner-only); shared_tier: a tier shared with other engines (replicas), by URL
    (``redis://127.0.0.1:6379/0``; ``memory://<name>``: in-process, for tests; None: none): every
    stored trace is written through to it and a local miss adopts its verified candidates
    (``kvshare.store.shared``); shared_key_file: the secret every replica seals and checks its
    entries with (None: ``$KVSHARE_HOME/shared-tier.key``); shared_ttl_s: seconds an entry
    lives unless read; shared_timeout_s: socket timeout of each call to it (a slow or down
    server is skipped, never an error)."""

    host_tier_bytes: int = 0
    disk_tier_dir: str | None = None
    disk_key_file: str | None = None
    disk_tier_bytes: int = 8 << 30
    disk_write_behind_bytes: int = 256 << 20
    eviction: str = "workflow"
    prefetch: bool = True
    pin_bytes: int = 64 << 20
    shared_tier: str | None = None
    shared_key_file: str | None = None
    shared_ttl_s: int = 86_400
    shared_timeout_s: float = 0.25

    def __post_init__(self) -> None:
        for name in ("disk_tier_dir", "disk_key_file", "shared_tier", "shared_key_file"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"{name} must be a str path or None, got {value!r}")
        set_fields(self, {
            "host_tier_bytes": check_int("host_tier_bytes", self.host_tier_bytes, 0, BYTES_MAX),
            "disk_tier_bytes": check_int("disk_tier_bytes", self.disk_tier_bytes, 0, BYTES_MAX),
            "disk_write_behind_bytes": check_int(
                "disk_write_behind_bytes", self.disk_write_behind_bytes, 0, BYTES_MAX
            ),
            "eviction": check_choice("eviction", self.eviction, EVICTIONS),
            "prefetch": check_bool("prefetch", self.prefetch),
            "pin_bytes": check_int("pin_bytes", self.pin_bytes, 0, BYTES_MAX),
            "shared_ttl_s": check_int("shared_ttl_s", self.shared_ttl_s, 1, 1 << 31),
            "shared_timeout_s": check_float("shared_timeout_s", self.shared_timeout_s, 0.001, 60),
        })  # fmt: skip
