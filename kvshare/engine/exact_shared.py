"""Exact prefixes shared between replicas in ``prefix`` mode, through the shared tier.

``prefix`` mode keeps no traces (it reuses exact prefixes only, through the radix cache), and
its KV is exact: a full prefill's. Its engines write what they computed to the shared tier
under their own key namespace (``EXACT``: never mixed with the relocating modes' traces,
whose KV may carry approximations) and, on a radix miss, adopt the candidate whose tokens
start with the longest prefix of the prompt into the radix cache, then match again. Every
candidate passed the tier's checks (checksum, seal, model, scope, tokens) before it is used.

Also owns ``trace_of``: the segment a call's KV is kept as (trace store, shared tier).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvshare.engine.request import Request
from kvshare.kernels import KV, slice_tokens
from kvshare.model.prompt import common_prefix
from kvshare.scope import Scope
from kvshare.store.contract import MIN_MATCH, StoredSegment
from kvshare.store.radix import RadixCache
from kvshare.store.shared import SharedTier

EXACT = "kvshare-exact"  # the key namespace of exact (prefix-mode) KV on the shared tier


def trace_of(req: Request, ids: tuple[int, ...], kv: KV, digest: str) -> StoredSegment:
    """A call's kept KV: ``ids`` (prompt + fed reply tokens) and KV [L, H, len(ids), D]."""
    bounds = tuple((s.start, f"m{s.index}") for s in req.prompt.segments)
    bounds += ((req.prompt.tail.start, "reply"),)
    return StoredSegment(req.scope, digest, ids, kv, "trace", "", req.agent, 0, "m0", bounds)


def adopt_prefix(
    tier: SharedTier, cache: RadixCache, scope: Scope, ids: Sequence[int], hit: int,
    found: list[KV], device: Any,
) -> tuple[int, list[KV]]:  # fmt: skip
    """``cache.match(scope, ids)`` after adopting, when at least ``2 * MIN_MATCH`` tokens
    miss, the shared candidate that extends the cached prefix of ``ids`` furthest."""
    if len(ids) - hit < 2 * MIN_MATCH:
        return hit, found
    best, n = None, hit
    for seg in tier.candidates(scope, ids, 4, ()):
        length = common_prefix(seg.tokens, ids)
        if length > n:
            best, n = seg, length
    if best is None:
        return hit, found
    kv = slice_tokens(best.kv, 0, n)
    cache.insert(scope, tuple(ids[:n]), KV(kv.keys.to(device), kv.values.to(device)))
    return cache.match(scope, ids)
