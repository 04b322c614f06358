"""Content checks of a loaded anchor pool file, run after its checksum and header passed.

They hold the rules a :class:`~kvshare.anchors.persist.PoolState` must satisfy before any of
it is used: the model identity matches the caller's, every tensor has its dtype and rank,
one anchor count per key, finite floats, counters in range, and one feature width and one
(layers, heads, head_dim) across keys equal to the model's. Each failure raises
:class:`StateFileError` (a corrupt file) or :class:`ModelMismatchError` (another model's
file) naming what is wrong; :mod:`kvshare.anchors.persist` calls them while decoding.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from kvshare.errors import ModelMismatchError, StateFileError

if TYPE_CHECKING:
    from kvshare.anchors.persist import KeyTensors, ModelIdentity


def bad(where: str, what: str) -> StateFileError:
    """The error for an unusable pool file at ``where``; ``what``: the reason."""
    return StateFileError(
        f"anchor pool file {where} is unusable: {what}; delete it (the pool relearns) or "
        f"restore a good copy"
    )


def check_identity(found: ModelIdentity | None, expected: ModelIdentity | None, where: str) -> None:
    """The file's model identity equals the caller's when both are known (else
    ModelMismatchError naming the first differing field)."""
    if found is None or expected is None or found == expected:
        return
    for f in dataclasses.fields(found):
        mine, theirs = getattr(found, f.name), getattr(expected, f.name)
        if mine != theirs:
            raise ModelMismatchError(
                f"anchor pool file {where} was written for another model: {f.name} is "
                f"{mine!r} in the file but {theirs!r} for this model; load a pool saved with "
                f"this model, or start with an empty pool"
            )


def check_tensor(t: Tensor, dtype: torch.dtype, ndim: int, label: str, where: str) -> Tensor:
    """``t`` itself if it has ``dtype``, ``ndim`` dimensions and at least one row."""
    if t.dtype != dtype or t.dim() != ndim or t.shape[0] < 1:
        raise bad(where, f"{label} is {t.dtype} {tuple(t.shape)}, not {dtype}")
    return t


def check_values(k: KeyTensors, tick: int, where: str) -> None:
    """Per-key consistency: one M for all tensors, finite floats, counters in range."""
    m = k.feats.shape[0]
    if any(t.shape[0] != m for t in (k.deltas, k.scales, k.counts, k.hits, k.born)):
        raise bad(where, "its tensors disagree on the number of anchors")
    if k.deltas.shape[2] != 2 or min(k.deltas.shape) < 1 or k.feats.shape[1] < 1:
        raise bad(where, f"deltas shape {tuple(k.deltas.shape)} is not [M, L, 2, H, D]")
    for name in ("feats", "deltas", "scales", "counts", "hits"):
        t = getattr(k, name)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise bad(where, f"{name} holds NaN or infinite values")
    if not (bool((k.scales > 0).all()) and bool((k.counts >= 1).all())):
        raise bad(where, "scales must be > 0 and counts >= 1")
    if not (bool((k.hits >= 0).all()) and bool(((k.born >= 0) & (k.born <= tick)).all())):
        raise bad(where, "hits must be >= 0 and born in [0, tick]")


def check_shapes(
    keys: dict[str, KeyTensors], identity: ModelIdentity | None, own: bool, where: str
) -> None:
    """One feature width and one (L, H, D) for every key, equal to ``identity`` if known.

    own: the identity came from the file itself (a disagreement is corruption, not a
    mismatch with the caller's model).
    """
    if not keys:
        return
    widths = {k.feats.shape[1] for k in keys.values()}
    dims = {(k.deltas.shape[1], k.deltas.shape[3], k.deltas.shape[4]) for k in keys.values()}
    if len(widths) != 1 or len(dims) != 1:
        raise bad(where, "context keys disagree on feature width or (layers, heads, head_dim)")
    if identity is None:
        return
    want = (identity.layers, identity.kv_heads, identity.head_dim)
    (found,) = dims
    if found != want:
        what = f"Δ (layers, heads, head_dim) is {found} but the model has {want}"
        if own:
            raise bad(where, what)
        raise ModelMismatchError(f"anchor pool file {where} was written for another model: {what}")
