"""Relocation: find stored KV for prompt tokens outside the exact prefix and move it in place."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from kvshare.kernels import KV, KernelOps, Move, TorchOps, shift_kv, slice_tokens
from kvshare.model.prompt import Prompt
from kvshare.store.contract import SegmentStore, StoredSegment


@dataclass(frozen=True)
class Run:
    """Prompt tokens ``[start, end)`` reuse ``segment`` tokens from ``offset`` on."""

    start: int
    end: int
    segment: StoredSegment
    offset: int

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Assembly:
    """The prompt's cache before the prefill.

    cache: KV [L, H, S, D]: exact prefix ``[0, prefix)``, relocated runs in place; the slots
    that must be computed are unset (uninitialised memory, written by the prefill before any
    read). relocated: [S] bool, True on relocated slots. ops: the kernel backend that built
    it, used by every later step that writes or scores this cache.
    """

    cache: KV
    prefix: int
    runs: tuple[Run, ...]
    relocated: Tensor
    ops: KernelOps = field(default_factory=TorchOps)

    @property
    def relocated_count(self) -> int:
        """Relocated slots, from the runs (disjoint) on the host: no device read."""
        return sum(run.length for run in self.runs)

    @property
    def fresh(self) -> Tensor:
        """[S] bool: tokens that have no KV at all (never seen) and must be computed."""
        mask = ~self.relocated.clone()
        mask[: self.prefix] = False
        return mask


def find_runs(prompt: Prompt, prefix: int, scope: Hashable, store: SegmentStore) -> list[Run]:
    """Verified stored runs for the tokens after the exact prefix, before the generation tail."""
    stop = prompt.tail.start
    if stop <= prefix:
        return []
    found = store.match(scope, prompt.ids[prefix:stop])
    return [Run(prefix + m.start, prefix + m.start + m.length, m.segment, m.offset) for m in found]


def relocated_kv(run: Run, rotary: nn.Module) -> KV:
    """The run's stored KV moved from canonical positions to ``[start, end)``: [L, H, n, D]."""
    part = slice_tokens(run.segment.kv, run.offset, run.offset + run.length)
    return shift_kv(part, run.start - run.offset, rotary)


def assemble(
    n: int,
    prefix_kv: KV | None,
    runs: list[Run],
    dims: tuple[int, int, int],
    rotary: nn.Module,
    dtype: torch.dtype,
    device: torch.device,
    ops: KernelOps | None = None,
) -> Assembly:
    """Build the [L, H, n, D] cache of a prompt of n tokens from a prefix and relocated runs
    (each run gathered, re-rotated and written by one ``ops.relocate``)."""
    ops = ops or TorchOps()
    layers, heads, dim = dims
    # Slots that will be computed are left unset: every such token is in the prefill's
    # selection at every layer, so its slot is written before any attention reads it (and
    # the engine checks the call's KV is finite before storing it).
    keys = torch.empty(layers, heads, n, dim, dtype=dtype, device=device)
    values = torch.empty_like(keys)
    prefix = prefix_kv.length if prefix_kv is not None else 0
    if prefix_kv is not None:
        keys[:, :, :prefix] = prefix_kv.keys
        values[:, :, :prefix] = prefix_kv.values
    relocated = torch.zeros(n, dtype=torch.bool, device=device)
    cache = KV(keys, values)
    for run in runs:
        ops.relocate(cache, Move(run.start, run.length, run.segment.kv, run.offset), rotary)
        relocated[run.start : run.end] = True
    return Assembly(cache, prefix, tuple(runs), relocated, ops)
