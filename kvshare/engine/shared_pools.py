"""Anchor pools per sharing scope shared through the shared tier (``kvshare.store.shared``).

A scope's pool is written to the shared tier when it changed (its ``tick`` grew since this
engine last wrote or read it; at most once per ``MIN_INTERVAL_S`` per scope) and read on a miss
(the first time this engine needs the scope's state). What is read passes the pool file's
checks (``kvshare.anchors.persist``: checksum, format, header, model identity, every tensor's
dtype, shape and finiteness) and the tier's seal; a blob that fails is deleted and the scope
starts with an empty pool. Any failure of the service is the tier's (counted there): the pool
stays local.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

from kvshare.anchors import AnchorPool, ModelIdentity
from kvshare.anchors.persist import decode_state, encode_state
from kvshare.errors import StateFileError
from kvshare.scope import Scope
from kvshare.store.shared import SharedTier

MIN_INTERVAL_S = 1.0  # a scope's pool is written at most this often
KIND = "pool"


class SharedPools:
    """The anchor pools of ``identity``'s model on ``tier``; ``anchors``: the engine's
    ``AnchorsConfig`` (device-side index and the budget a loaded pool takes on)."""

    def __init__(self, tier: SharedTier, identity: ModelIdentity, device: Any, anchors: Any):
        self.tier, self.identity, self.device, self.anchors = tier, identity, device, anchors
        self.loaded = self.written = self.rejected = 0
        self._seen: dict[Scope, tuple[int, float]] = {}  # tick last shared, when
        self._lock = threading.Lock()

    def fetch(self, scope: Scope) -> AnchorPool | None:
        """The scope's shared pool, verified, or None (none, or one that failed a check)."""
        data = self.tier.get_blob(KIND, scope)
        if data is None:
            return None
        try:
            state = decode_state(data, self.identity, f"the shared anchor pool of {scope}")
            pool = AnchorPool.from_state(state, "shared", self.device, self.anchors.anchor_index)
        except StateFileError:
            self.rejected += 1
            self.tier.drop_blob(KIND, scope)
            return None
        pool.config = dataclasses.replace(
            pool.config, neighbours=self.anchors.neighbours,
            budget_bytes=self.anchors.anchor_budget_bytes,
        )  # fmt: skip
        with self._lock:
            self._seen[scope] = (pool.tick, time.monotonic())
            self.loaded += 1
        return pool

    def publish(self, scope: Scope, pool: AnchorPool) -> bool:
        """Write ``pool`` if it changed since it was last shared (and not too recently)."""
        tick, now = pool.tick, time.monotonic()
        with self._lock:
            last_tick, at = self._seen.get(scope, (0, -MIN_INTERVAL_S))
            if tick == last_tick or now - at < MIN_INTERVAL_S:
                return False
            self._seen[scope] = (tick, now)
        done = self.tier.put_blob(KIND, scope, encode_state(pool.state(self.identity)))
        self.written += done
        return done
