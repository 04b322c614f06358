"""``kvshare serve --replicas`` on a real local Ray (one instance for the module, 2 replicas
of the tiny model, the cache-affinity router, a real redis-server as their shared KV tier).
A Ray or a Redis that cannot start fails the module's tests with its reason."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from kvshare.bench.local_redis import LocalRedis
from kvshare.config import EngineConfig
from kvshare.errors import RayStartError, ServiceUnavailableError
from kvshare.serve import ServeConfig
from kvshare.serve.auth import add_key, read_keys
from kvshare.serve.run import free_port

from factories import DOC


@dataclass
class Cluster:
    base: str
    key: str
    model: str

    def client(self, key: str | None = "own") -> httpx.Client:
        auth = {"Authorization": f"Bearer {self.key if key == 'own' else key}"} if key else {}
        return httpx.Client(base_url=self.base, headers=auth, timeout=120)

    def ask(
        self, c: httpx.Client, session: str, agent: int, doc: str | None = None, **extra
    ) -> httpx.Response:
        """Agent ``agent`` of workflow ``session``; ``doc``: a document every agent of the
        workflow reads first (its KV an exact prefix of theirs), else a short prompt."""
        msgs = [{"role": "system", "content": f"You are agent {agent}."},
                {"role": "user", "content": f"The shared document of {session}. Go."}]  # fmt: skip
        if doc is not None:
            msgs = [{"role": "system", "content": doc},
                    {"role": "user", "content": f"Agent {agent}: your part."}]  # fmt: skip
        body = {"model": self.model, "messages": msgs, "max_tokens": 3, "temperature": 0}
        head = {"X-KVShare-Session": session, "X-KVShare-Agent": f"a{agent}"}
        return c.post("/v1/chat/completions", json={**body, **extra}, headers=head)


@pytest.fixture(scope="module")
def cluster(tiny_dirs, tmp_path_factory) -> Iterator[Cluster]:
    from kvshare.serve.ray_app import ReplicaSpec
    from kvshare.serve.ray_cluster import deploy, ray_session, undeploy

    keys = tmp_path_factory.mktemp("ray-keys") / "keys.json"
    key = add_key(keys, "alice")
    try:
        redis = LocalRedis()
        redis.start()
    except ServiceUnavailableError as exc:
        pytest.fail(str(exc))
    shared = EngineConfig.of(mode="prefix", shared_tier=redis.url,
                             shared_key_file=str(keys.parent / "shared.key"))  # fmt: skip
    spec = ReplicaSpec(
        model=str(tiny_dirs["llama"]), engine=shared,
        serve=ServeConfig(keys_file=str(keys)), keys=read_keys(keys), cpus=0.5,
    )  # fmt: skip
    port = free_port()
    session = ray_session(None, 2)
    try:
        session.__enter__()
        deploy(spec, 2, "127.0.0.1", port)
    except RayStartError as exc:
        session.__exit__(None, None, None)
        redis.close()
        pytest.fail(f"Ray (Serve) could not start here: {exc}")
    try:
        yield Cluster(f"http://127.0.0.1:{port}", key, tiny_dirs["llama"].name)
    finally:
        undeploy(local=True)
        session.__exit__(None, None, None)
        redis.close()


def test_agents_of_a_workflow_land_on_one_replica_and_workflows_spread(cluster):
    homes = {}
    with cluster.client() as c:
        for wf in range(6):
            served = set()
            for agent in range(3):
                r = cluster.ask(c, f"wf{wf}", agent)
                assert r.status_code == 200, r.text
                served.add(r.headers["x-kvshare-replica"])
            assert len(served) == 1, f"wf{wf} ran on {served}"
            homes[wf] = served.pop()
        assert len(set(homes.values())) == 2  # both replicas hold workflows
        with c.stream("POST", "/v1/chat/completions", json={
            "model": cluster.model, "stream": True, "max_tokens": 3,
            "messages": [{"role": "user", "content": "The shared document of wf0. Go."}],
        }, headers={"X-KVShare-Session": "wf0"}) as r:  # fmt: skip
            assert r.status_code == 200 and r.headers["x-kvshare-replica"] == homes[0]
            assert r.read().endswith(b"data: [DONE]\n\n")


def test_api_keys_are_enforced_through_the_replicated_app(cluster):
    with cluster.client(None) as anon, cluster.client("kvs_00000000_forged") as forged:
        for c in (anon, forged):
            r = cluster.ask(c, "auth", 0)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert c.get("/v1/models").status_code == 401
    with cluster.client() as c:
        assert cluster.ask(c, "auth", 0).status_code == 200
        models = c.get("/v1/models").json()["data"]
        assert [m["id"] for m in models] == [cluster.model]
        time.sleep(2.5)  # the replicas report every second
        t0 = time.monotonic()
        text = c.get("/metrics", timeout=30).text
    assert time.monotonic() - t0 < 15
    free = [ln for ln in text.splitlines() if ln.startswith("kvshare_routing_free_kv_bytes{")]
    assert len(free) == 2 and all(float(ln.split()[-1]) > 0 for ln in free)
    assert "# TYPE kvshare_routing_queue gauge" in text
    missing = int(next(ln for ln in text.splitlines() if ln.startswith("kvshare_scrape_missing "))
                  .split()[-1])  # fmt: skip
    scraped = {ln.split('replica="')[1].split('"')[0] for ln in text.splitlines()
               if ln.startswith("kvshare_requests_total{")}  # fmt: skip
    assert missing == 0 and len(scraped) == 2  # every replica scraped, in time
    assert text.count("# TYPE kvshare_requests_total counter") == 1


def _reuse(r: httpx.Response) -> float:
    usage = r.json()["usage"]
    return usage["prompt_tokens_details"]["cached_tokens"] / usage["prompt_tokens"]


def test_a_killed_replica_sends_the_next_agent_elsewhere_and_it_reuses_through_redis(cluster):
    """The workflow's replica dies after two agents; the third lands on the other replica,
    which never saw this document, and still reuses most of its prompt: the earlier agents'
    KV, read from the shared Redis tier (checked on read: the same tokens, model, tenant)."""
    import ray

    doc = f"{DOC} Failover ledger {time.time_ns()}."  # a document no other test used
    with cluster.client() as c:
        first = cluster.ask(c, "kill-wf", 0, doc)
        assert first.status_code == 200
        home = first.headers["x-kvshare-replica"]
        second = cluster.ask(c, "kill-wf", 1, doc)
        assert second.headers["x-kvshare-replica"] == home and _reuse(second) > 0.5
        actor = ray.get_actor(f"SERVE_REPLICA::kvshare#ReplicaServer#{home}", namespace="serve")
        ray.kill(actor, no_restart=True)
        t0 = time.monotonic()
        after = cluster.ask(c, "kill-wf", 2, doc)
        assert after.status_code == 200, after.text
        assert after.headers["x-kvshare-replica"] != home
        assert time.monotonic() - t0 < 60
        assert _reuse(after) >= 0.5, after.json()["usage"]  # the failover target
        again = cluster.ask(c, "kill-wf", 3, doc)  # the workflow stays on its new replica
        assert again.headers["x-kvshare-replica"] == after.headers["x-kvshare-replica"]


def test_an_unreachable_ray_address_fails_fast_with_the_reason():
    from kvshare.serve.ray_cluster import check_reachable, ray_session

    t0 = time.monotonic()
    with pytest.raises(RayStartError, match="no Ray head answers at 127.0.0.1:1"):
        check_reachable("127.0.0.1:1")
    with pytest.raises(RayStartError, match="HOST:PORT"), ray_session("nonsense", 1):
        pass
    assert time.monotonic() - t0 < 10
