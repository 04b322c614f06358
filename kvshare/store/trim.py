"""Cutting a stored trace down to its head: the prefix its writer reads again.

A trace is one call's whole sequence (its prompt and reply). An agent that runs again on a
new input behind the same role prompt reads only the first part of its last trace (its
role prompt and template: the head), while the rest (the shared input, the replies) serves
the agents after it. Under memory pressure a tiered store cuts a trace that only its writer
still needs down to the head that writer was seen to read (``TieredStore.record_call``)
instead of keeping or dropping all of it. A head is exact: causal attention makes the KV of
a prefix the prefix of the KV, at the same positions, so a prefix hit on a head is
bit-identical to one on the whole trace.
"""

from __future__ import annotations

from dataclasses import replace

from kvshare.kernels import KV
from kvshare.model.prompt import token_hash
from kvshare.store.contract import StoredSegment

HEAD = "head"  # the ``kind`` of a segment cut from a trace


def cut(segment: StoredSegment, n: int) -> StoredSegment:
    """The first ``n`` tokens of ``segment`` (0 < n < its length) as a segment of their own:
    KV [L, H, n, D] copied (a view would keep the whole trace's memory alive), content hash
    of its tokens, bounds up to ``n``, kind ``head``."""
    if not 0 < n < len(segment.tokens):
        raise ValueError(f"cut: n={n} must be in (0, {len(segment.tokens)})")
    kv = KV(segment.kv.keys[:, :, :n].clone(), segment.kv.values[:, :, :n].clone())
    tokens = segment.tokens[:n]
    bounds = tuple(b for b in segment.bounds if b[0] < n)
    digest = token_hash(tokens)
    return replace(segment, content_hash=digest, tokens=tokens, kv=kv, kind=HEAD, bounds=bounds)
