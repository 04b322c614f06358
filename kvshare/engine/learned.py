"""Everything an engine learns from calls, kept per sharing scope like the KV it came from.

A scope's state: its anchor pool (deviations, features, validated gains, hit counters) and
the adaptive recompute ratio of ``kvshare`` mode. Offsets learned from one tenant's calls
are therefore never added to another tenant's KV, and one tenant's traffic never moves
another's ratio. ``share_scope='global'`` has one scope, so everything is shared as before.
All pools live under one byte budget (``EngineConfig.anchor_budget_bytes``): when it is
exceeded, the pools of the least recently used scopes shrink first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from kvshare.anchors import AnchorPool
from kvshare.config import EngineConfig
from kvshare.engine.shared_pools import SharedPools
from kvshare.scope import Scope


@dataclass
class ScopeState:
    """pool: the scope's anchor pool (None in modes without anchors); ratio: its current
    ``kvshare`` recompute ratio."""

    pool: AnchorPool | None
    ratio: float


class LearnedState:
    """Per-scope :class:`ScopeState`, created on first use; anonymous scopes get a fresh state
    that is never kept. ``anchored``: the mode keeps anchor pools, on ``device`` (the
    model's: estimates never leave it). Thread-safe."""

    def __init__(
        self,
        config: EngineConfig,
        anchored: bool,
        device: torch.device | str = "cpu",
        shared: SharedPools | None = None,
    ) -> None:
        self.config = config
        self.shared = shared  # anchor pools shared with other replicas (read on a miss)
        self.anchored = anchored
        self.device = torch.device(device)
        self._states: OrderedDict[Scope, ScopeState] = OrderedDict()
        self._lock = threading.Lock()

    def _fresh(self) -> ScopeState:
        c = self.config
        pool = None
        if self.anchored:
            pool = AnchorPool(c.anchors.pool, self.device, c.anchors.anchor_index)
        return ScopeState(pool, c.select.recompute_ratio)

    def get(self, scope: Scope) -> ScopeState:
        """The scope's state (created empty on first use), marked most recently used."""
        if scope.anonymous:
            return self._fresh()
        with self._lock:
            state = self._states.get(scope)
            if state is None:
                state = self._states[scope] = self._fresh()
                if self.shared is not None and state.pool is not None:
                    state.pool = self.shared.fetch(scope) or state.pool
            self._states.move_to_end(scope)
            return state

    def peek(self, scope: Scope) -> ScopeState | None:
        """The scope's state if it has one (does not create or touch it)."""
        with self._lock:
            return self._states.get(scope)

    def publish(self, scope: Scope) -> None:
        """Share the scope's pool if it changed (``kvshare.engine.shared_pools``)."""
        state = None if self.shared is None or scope.anonymous else self.peek(scope)
        if self.shared is not None and state is not None and state.pool is not None:
            self.shared.publish(scope, state.pool)

    def put_pool(self, scope: Scope, pool: AnchorPool) -> None:
        """Replace the scope's anchor pool (e.g. one loaded from a file), then fit the budget."""
        state = self.get(scope)
        state.pool = pool
        self.fit_budget(scope)

    @property
    def bytes_used(self) -> int:
        with self._lock:
            return sum(s.pool.bytes_used for s in self._states.values() if s.pool is not None)

    def fit_budget(self, current: Scope, reserve: int = 0) -> None:
        """Shrink pools until all of them fit the budget with ``reserve`` bytes to spare (room
        made before an admission, so the budget holds at every instant): least recently used
        scopes first, ``current`` last."""
        budget = max(0, self.config.anchors.anchor_budget_bytes - reserve)
        with self._lock:
            pools = [(s, st.pool) for s, st in self._states.items() if st.pool is not None]
            pools.sort(key=lambda item: item[0] == current)  # stable: LRU order, current last
            excess = sum(pool.bytes_used for _, pool in pools) - budget
            for _, pool in pools:
                if excess <= 0:
                    return
                before = pool.bytes_used
                pool.shrink(max(0, before - excess))
                excess -= before - pool.bytes_used

    def fingerprint(self) -> tuple:
        """Per kept scope: (scope, ratio, pool fingerprint); equal before and after a call
        when the call changed nothing learned."""
        with self._lock:
            items = list(self._states.items())
        return tuple(
            (scope, st.ratio, st.pool.fingerprint() if st.pool is not None else None)
            for scope, st in items
        )

    def clear(self) -> None:
        with self._lock:
            self._states.clear()
