"""Tiers of KV storage: one level (device memory, host memory, disk) that holds whole stored
segments (``kvshare.store.contract.StoredSegment``) by key, and knows nothing of the others.

``kvshare.store.tiered.TieredStore`` stacks tiers, moves segments between them by priority and
keeps the invariants every store has (scoped sharing, token verification, byte budgets).
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace
from typing import ClassVar

import torch

from kvshare.kernels import KV
from kvshare.store.contract import StoredSegment, StoreKey


class KVTier(ABC):
    """Contract of one tier.

    - ``name``: ``device``, ``host``, ``disk`` or ``null``; ``budget_bytes`` >= 0.
    - ``bytes_used <= budget_bytes`` after every call; a tier never evicts on its own: a
      ``put`` that does not fit returns False (the stack decides what moves where).
    - ``put(segment)`` keeps a copy of ``segment.kv`` on this tier's medium (tokens and
      metadata unchanged); a key already present is left as it is (True).
    - ``get(key, tokens)`` returns the segment only if the key is present *and* its tokens
      equal ``tokens`` exactly (the scope is part of the key); its KV is on this tier's
      medium: KV [L, H, n, D] as stored.
    - ``remove(key)`` frees the segment and returns the bytes freed (0 when absent). KV that
      a caller still holds stays valid: tiers hand out tensors, never views of memory they
      reuse, and the stack never removes a leased segment (``TieredStore.lease``).
    - Thread-safe.
    """

    name: str
    budget_bytes: int
    durable: ClassVar[bool] = False  # what it holds outlives the process (a disk tier)

    @abstractmethod
    def put(self, segment: StoredSegment) -> bool: ...

    @abstractmethod
    def get(self, key: StoreKey, tokens: Sequence[int]) -> StoredSegment | None: ...

    @abstractmethod
    def remove(self, key: StoreKey) -> int: ...

    @abstractmethod
    def keys(self) -> list[StoreKey]: ...

    @abstractmethod
    def listing(self) -> list[tuple[StoreKey, tuple[int, ...], int]]:
        """(key, tokens, nbytes) of every stored segment: what a stack adopts when it is
        built over a tier that already holds segments (a disk tier after a restart)."""

    @abstractmethod
    def __contains__(self, key: StoreKey) -> bool: ...

    @property
    @abstractmethod
    def bytes_used(self) -> int: ...

    @abstractmethod
    def clear(self) -> None: ...

    def __len__(self) -> int:
        return len(self.keys())

    def free_bytes(self) -> int:
        return self.budget_bytes - self.bytes_used


class NullTier(KVTier):
    """Holds nothing (the naive implementation and the oracle: every lookup misses)."""

    name = "null"
    budget_bytes = 0

    def put(self, segment: StoredSegment) -> bool:
        return False

    def get(self, key: StoreKey, tokens: Sequence[int]) -> StoredSegment | None:
        return None

    def remove(self, key: StoreKey) -> int:
        return 0

    def keys(self) -> list[StoreKey]:
        return []

    def listing(self) -> list[tuple[StoreKey, tuple[int, ...], int]]:
        return []

    def __contains__(self, key: StoreKey) -> bool:
        return False

    @property
    def bytes_used(self) -> int:
        return 0

    def clear(self) -> None:
        pass


def kv_to(kv: KV, device: torch.device, pin: bool = False, non_blocking: bool = False) -> KV:
    """``kv`` on ``device`` (a copy unless it is already there); ``pin``: page-locked host
    memory (CUDA only), which a copy back to the device needs to be asynchronous. The tier
    moves do not use that yet: they copy on the caller's stream and block (no side stream)."""
    if kv.keys.device == device and not pin:
        return kv
    keys = kv.keys.to(device, non_blocking=non_blocking)
    values = kv.values.to(device, non_blocking=non_blocking)
    if pin and device.type == "cpu" and torch.cuda.is_available():
        keys, values = keys.pin_memory(), values.pin_memory()
    return KV(keys, values)


class MemoryTier(KVTier):
    """Segments in memory on ``device``: the device tier (the model's device: GPU memory
    when there is one, else host RAM) or the host tier (``device="cpu"``, pinned when CUDA
    is present)."""

    def __init__(self, name: str, device: torch.device | str, budget_bytes: int) -> None:
        self.name, self.device = name, torch.device(device)
        self.budget_bytes = int(budget_bytes)
        self.pin = self.device.type == "cpu" and torch.cuda.is_available()
        self._items: OrderedDict[StoreKey, StoredSegment] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, segment: StoredSegment) -> bool:
        with self._lock:  # reserve the bytes first: concurrent puts never overshoot
            if segment.key in self._items:
                return True
            if self._bytes + segment.nbytes > self.budget_bytes:
                return False
            self._bytes += segment.nbytes
        try:
            moved = replace(segment, kv=kv_to(segment.kv, self.device, self.pin))
        except BaseException:
            with self._lock:
                self._bytes -= segment.nbytes
            raise
        with self._lock:
            if segment.key in self._items:  # another thread stored it meanwhile
                self._bytes -= segment.nbytes
            else:
                self._items[segment.key] = moved
            return True

    def get(self, key: StoreKey, tokens: Sequence[int]) -> StoredSegment | None:
        with self._lock:
            seg = self._items.get(key)
        return seg if seg is not None and seg.tokens == tuple(tokens) else None

    def remove(self, key: StoreKey) -> int:
        with self._lock:
            seg = self._items.pop(key, None)
            if seg is None:
                return 0
            self._bytes -= seg.nbytes
            return seg.nbytes

    def keys(self) -> list[StoreKey]:
        with self._lock:
            return list(self._items)

    def listing(self) -> list[tuple[StoreKey, tuple[int, ...], int]]:
        with self._lock:
            return [(k, s.tokens, s.nbytes) for k, s in self._items.items()]

    def __contains__(self, key: StoreKey) -> bool:
        with self._lock:
            return key in self._items

    @property
    def bytes_used(self) -> int:
        return self._bytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0
