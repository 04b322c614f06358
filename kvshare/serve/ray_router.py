"""Ray Serve's request router for kvshare replicas: cache affinity with a load brake.

Set on the replica deployment by ``kvshare.serve.ray_app`` (``RequestRouterConfig(
request_router_class=CacheAffinityRouter, request_router_kwargs={"threshold": ...})``); it
runs in the process holding the handle (the ingress). For a request whose first argument is
a :class:`~kvshare.serve.affinity.Route`, :meth:`choose_replicas` ranks the live replicas
with :class:`~kvshare.sched.replicas.AffinityChooser` (the key's two candidates on a hash
ring over stable slots, the less loaded winning unless the key's last replica is within
``threshold`` requests of it; then the other candidate; then the rest), one replica per
rank: Ray tries them in order and skips a full or dead one, which is how a dead replica's
keys reach their second choice before the controller drops it. A replica's load is the
larger of the router's own queue-length cache and the ``queue`` its
``record_routing_stats`` last reported. Imports Ray: load it only when serving on Ray.
"""

from __future__ import annotations

from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from kvshare.sched.replicas import AffinityChooser
from kvshare.serve import affinity
from kvshare.serve.affinity import Route


def route_in(pending: PendingRequest | None) -> Route | None:
    """The :class:`Route` a request carries as its first argument, if any."""
    if pending is None or not pending.args:
        return None
    first = pending.args[0]
    return first if isinstance(first, Route) else None


class CacheAffinityRouter(RequestRouter):
    """Routes a workflow's requests to the replica that holds its KV (module docstring)."""

    def initialize_state(self, threshold: int = 1, vnodes: int = 64, **_: Any) -> None:
        self._chooser = AffinityChooser(threshold=threshold, vnodes=vnodes)
        affinity.LIVE[self._deployment_id.name] = self  # module attribute: see affinity.LIVE

    def replica_ids(self) -> list[str]:
        """The replicas this router can send to now."""
        return [rid.unique_id for rid in self.curr_replicas]

    def reported(self) -> dict[str, dict[str, Any]]:
        """What each replica last reported through ``record_routing_stats`` (by id)."""
        return {rid.unique_id: dict(r.routing_stats or {}) for rid, r in self.curr_replicas.items()}

    def load(self, replica: RunningReplica) -> int:
        """Requests queued or running on ``replica`` (module docstring)."""
        cached = self.replica_queue_len_cache.get(replica.replica_id) or 0
        reported = (replica.routing_stats or {}).get("queue", 0)
        return max(int(cached), int(reported))

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        route = route_in(pending_request)
        if route is None:  # not a kvshare call: any replica, Ray takes the least queued
            return [candidate_replicas]
        if route.pin is not None:
            return [[by_id[route.pin]]] if route.pin in by_id else [candidate_replicas]
        loads = {rid: self.load(r) for rid, r in by_id.items()}
        return [[by_id[rid]] for rid in self._chooser.rank(route.key, by_id, loads)]

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any
    ) -> None:
        route = route_in(pending_request)
        if route is not None and route.pin is None:
            self._chooser.settle(route.key, replica_id.unique_id)
