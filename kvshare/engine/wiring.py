"""How an :class:`~kvshare.engine.engine.Engine` is put together from a loaded model and its
config: the scheduler, the stores (the trace store tiered or not), the pipeline's parts,
the stop ids, the prefetcher and the idle-time teacher."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from kvshare.anchors import ModelIdentity
from kvshare.config import EngineConfig
from kvshare.engine import pipeline
from kvshare.engine.batcher import DecodeBatcher
from kvshare.engine.exact_shared import EXACT
from kvshare.engine.idle import IdleTeacher
from kvshare.engine.learned import LearnedState
from kvshare.engine.policy import ReusePolicy
from kvshare.engine.shared_pools import SharedPools
from kvshare.errors import ConfigError
from kvshare.kernels import kernels_for
from kvshare.model.adapter import ModelAdapter
from kvshare.model.batched import BatchedDecoder, batchable
from kvshare.model.load import LoadedModel
from kvshare.sched.prefetch import Prefetcher
from kvshare.sched.schedule import BaseScheduler, LRUScheduler, Scheduler, SchedulerConfig
from kvshare.store.radix import RadixCache
from kvshare.store.segments import LRUSegmentStore, NullSegmentStore, SegmentStore
from kvshare.store.shared import build_shared
from kvshare.store.tiered import TieredStore, build_tiers, scheduler_priority


def check_feature_layer(config: EngineConfig, adapter: ModelAdapter) -> None:
    """ConfigError unless ``anchors.feature_layer`` is a layer of the model."""
    layers = adapter.kv_dims[0]
    if config.anchors.feature_layer >= layers:
        raise ConfigError(
            f"feature_layer {config.anchors.feature_layer} is not a layer of this model "
            f"({layers} layers); pick one in [0, {layers - 1}]"
        )


def make_scheduler(config: EngineConfig) -> BaseScheduler:
    """The workflow scheduler (``tiers.eviction == "workflow"``), else the LRU one."""
    tiers = config.tiers
    if tiers.eviction == "workflow":
        return Scheduler(SchedulerConfig(pin_bytes=tiers.pin_bytes))
    return LRUScheduler()


def segment_store(
    config: EngineConfig, adapter: ModelAdapter, model: Any, scheduler: BaseScheduler
) -> SegmentStore:
    """The trace store: an LRU store, or a tiered one (``TiersConfig``) whose order comes
    from the workflow scheduler (``kvshare.sched.schedule``)."""
    tiers, budget = config.tiers, config.store.segment_store_bytes
    workflow = tiers.eviction == "workflow"
    local = not tiers.host_tier_bytes and tiers.disk_tier_dir is None
    if not workflow and local and tiers.shared_tier is None:
        return LRUSegmentStore(budget)
    stack = build_tiers(tiers, budget, adapter.device, model)
    priority, pinned = scheduler_priority(scheduler), scheduler.pinned
    shared = build_shared(tiers, model)
    return TieredStore(stack, priority, pinned, trim=workflow, shared=shared)


def eos_ids(loaded: LoadedModel) -> set[int]:
    """The tokenizer's end-of-sequence id and those of the model's generation config."""
    ids = {loaded.tokenizer.eos_token_id}
    gen = getattr(loaded.model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    ids.update(extra if isinstance(extra, list) else [extra])
    return {int(i) for i in ids if i is not None}


def make_parts(
    loaded: LoadedModel,
    config: EngineConfig,
    policy: ReusePolicy,
    adapter: ModelAdapter,
    scheduler: BaseScheduler,
) -> pipeline.Parts:
    """The pipeline's parts: kernels (KernelUnavailableError first), the prefix cache, the
    trace store (a null one unless traces are kept and the mode relocates), learned state."""
    store = config.store
    traces = store.store_segments and policy.relocates
    backend = config.kernels.kernel_backend
    segments = (
        segment_store(config, adapter, loaded.model, scheduler) if traces else NullSegmentStore()
    )
    shared, pools = getattr(segments, "shared", None), None
    if shared is not None and policy.anchored:
        identity = ModelIdentity.of(loaded.model)
        pools = SharedPools(shared, identity, adapter.device, config.anchors)
    return pipeline.Parts(
        loaded=loaded,
        config=config,
        policy=policy,
        adapter=adapter,
        kernels=kernels_for(adapter.device, backend),  # KernelUnavailableError first
        prefix_cache=RadixCache(store.prefix_cache_bytes),
        segments=segments,
        learned=LearnedState(config, policy.anchored, adapter.device, pools),
        exact_shared=exact_shared(config, policy, loaded.model, traces),
        eos_ids=frozenset(eos_ids(loaded)),
    )


def exact_shared(config: EngineConfig, policy: ReusePolicy, model: Any, traces: bool) -> Any:
    """The shared tier of exact prefixes (``kvshare.engine.exact_shared``): for a mode that
    keeps KV but no traces (``prefix``), when ``tiers.shared_tier`` names one; else None."""
    if traces or not policy.keeps_kv:
        return None
    return build_shared(config.tiers, model, prefix=EXACT)


def make_prefetcher(
    parts: pipeline.Parts, turn: Callable[[], AbstractContextManager[Any]]
) -> Prefetcher | None:
    """The prefetcher hints start (None unless ``tiers.prefetch`` and the mode keeps KV).
    ``turn``: the engine's turn on the model; on CPU a prefetch takes it (the cores are
    shared only between calls), on an accelerator it overlaps calls."""
    if not (parts.config.tiers.prefetch and parts.policy.keeps_kv):
        return None
    on_cpu = parts.adapter.device.type == "cpu"
    tiered = parts.segments if isinstance(parts.segments, TieredStore) else None
    return Prefetcher(tiered, turn if on_cpu else nullcontext, overlap=not on_cpu)


def make_teacher(parts: pipeline.Parts, turns: AbstractContextManager[Any]) -> IdleTeacher | None:
    """The idle-time teacher (None unless ``anchors.idle_teach`` and the mode learns anchors)."""
    a = parts.config.anchors
    if not (a.idle_teach and parts.policy.anchored):
        return None
    return IdleTeacher(parts, turns, a.idle_quiet_s, a.idle_jobs)


def make_batcher(parts: pipeline.Parts, turns: AbstractContextManager[Any]) -> DecodeBatcher | None:
    """The decode step loop (None where ``batch_decode`` is off or the model's layout cannot
    be batched: calls then decode alone, in turn slices)."""
    if not (parts.config.batch_decode and batchable(parts.model)):
        return None
    c, dims = parts.config, parts.adapter.kv_dims
    step = BatchedDecoder(parts.model)
    return DecodeBatcher(step, turns, dims, c.max_decode_batch, c.decode_pool_bytes)
