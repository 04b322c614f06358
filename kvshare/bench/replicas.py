"""``kvshare bench --workload replicas``: live token reuse of kvshare on Ray Serve replicas.

W synthetic workflows run at once over HTTP (``SyntheticWorkload``: every workflow its own
shared document, its agents one after another, each seeing the earlier agents' answers, all
under the workflow's session), against three set-ups on one local Ray, each deployed fresh
(empty stores): one replica alone, R replicas behind Ray's default router, and R replicas
behind the cache-affinity router. Per set-up: token reuse (``cached_tokens`` over
``prompt_tokens`` of every call), its share of the single replica's, the calls whose answer
differs from the single replica's (greedy), errors, and the most replicas one workflow's
agents ran on.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import replace
from typing import Any

import httpx
from pydantic import BaseModel

# (name, replicas: 0 for the R measured, router)
SETUPS = (
    ("one replica", 1, "default"),
    ("Ray default", 0, "default"),
    ("cache affinity", 0, "affinity"),
)


class ReplicaRow(BaseModel):
    setup: str
    replicas: int
    router: str
    calls: int
    errors: int
    prompt_tokens: int
    reused_tokens: int
    token_reuse: float
    of_single: float = 1.0
    differ_from_single: int = 0
    max_replicas_per_workflow: int
    replicas_used: int
    wall_s: float


async def _workflow(
    client: httpx.AsyncClient, model: str, workload: Any, w: int, agents: int | None = None
) -> list[dict]:
    """The first ``agents`` (default: every) agents of workflow ``w`` in turn; one record
    per call."""
    outputs: list[str] = []
    calls: list[dict[str, Any]] = []
    for i in range(workload.n_agents if agents is None else agents):
        body = {"model": model, "messages": workload.messages(i, outputs, item=w),
                "max_tokens": workload.output_len, "temperature": 0}  # fmt: skip
        head = {"X-KVShare-Session": f"wf{w}", "X-KVShare-Agent": workload.agent_name(i)}
        r = await client.post("/v1/chat/completions", json=body, headers=head)
        if r.status_code != 200:
            calls.append({"error": r.text})
            outputs.append("")
            continue
        data = r.json()
        text = data["choices"][0]["message"]["content"]
        usage = data["usage"]
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        calls.append({"text": text, "prompt": usage["prompt_tokens"], "cached": cached,
                      "replica": r.headers.get("x-kvshare-replica"), "wf": w})  # fmt: skip
        outputs.append(text)
    return calls


async def _run_all(base: str, workload: Any) -> list[list[dict]]:
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        jobs = [_workflow(client, model, workload, w) for w in range(workload.n_items)]
        return list(await asyncio.gather(*jobs))


def _row(name: str, replicas: int, router: str, runs: list[list[dict]], wall: float) -> ReplicaRow:
    calls = [c for run in runs for c in run]
    ok = [c for c in calls if "error" not in c]
    prompt, cached = sum(c["prompt"] for c in ok), sum(c["cached"] for c in ok)
    spread = max((len({c["replica"] for c in run if "error" not in c}) for run in runs), default=0)
    return ReplicaRow(
        setup=name, replicas=replicas, router=router, calls=len(calls),
        errors=len(calls) - len(ok), prompt_tokens=prompt, reused_tokens=cached,
        token_reuse=cached / max(prompt, 1), max_replicas_per_workflow=spread,
        replicas_used=len({c["replica"] for c in ok}), wall_s=wall,
    )  # fmt: skip


def measure(spec: Any, workload: Any, replicas: int) -> list[ReplicaRow]:
    """The three set-ups' rows (module docstring) on one local Ray; ``spec``: the
    ReplicaSpec every replica gets (its router replaced per set-up)."""
    from kvshare.serve.ray_cluster import deploy, ray_session, undeploy
    from kvshare.serve.run import free_port

    rows: list[ReplicaRow] = []
    texts: list[list[str]] = []
    cpus = max(os.cpu_count() or 1, int(replicas * spec.cpus + 0.999))
    with ray_session(None, cpus):
        port = free_port()
        for name, n, router in SETUPS:
            n = n or replicas
            deploy(replace(spec, router=router), n, "127.0.0.1", port)
            try:
                t0 = time.perf_counter()
                runs = asyncio.run(_run_all(f"http://127.0.0.1:{port}", workload))
                rows.append(_row(name, n, router, runs, time.perf_counter() - t0))
                texts.append([c.get("text", "") for run in runs for c in run])
            finally:
                undeploy(local=False)
    for row, answers in zip(rows, texts, strict=True):
        row.of_single = row.token_reuse / max(rows[0].token_reuse, 1e-9)
        row.differ_from_single = sum(a != b for a, b in zip(answers, texts[0], strict=True))
    return rows


def _table(columns: list[str], lines: list[str]) -> str:
    """A markdown table: ``columns`` and one line per row (each ending in a newline)."""
    return "| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|\n" + "".join(lines)


def markdown(rows: list[ReplicaRow]) -> str:
    columns = ["set-up", "replicas", "token reuse", "of one replica's", "answers differing",
               "errors", "most replicas per workflow", "replicas used", "wall s"]  # fmt: skip
    return _table(columns, [
        f"| {r.setup} | {r.replicas} | {r.token_reuse:.1%} | {r.of_single:.1%} | "
        f"{r.differ_from_single}/{r.calls} | {r.errors} | {r.max_replicas_per_workflow} | "
        f"{r.replicas_used} | {r.wall_s:.1f} |\n"
        for r in rows
    ])  # fmt: skip


class FailoverRow(BaseModel):
    """One workflow whose replica is killed before its last agent: the replicas before and
    after, the earlier agents' reuse there, the last agent's reuse on the other replica (read
    from the shared tier) and errors."""

    workflow: int
    home: str
    after: str
    earlier_reuse: float
    failover_reuse: float
    errors: int


def measure_failover(spec: Any, workload: Any, workflows: int) -> list[FailoverRow]:
    """R = 2 replicas (``spec``'s engine names the shared tier) behind the affinity router;
    each workflow in turn runs its agents but the last on its replica, that replica is killed
    (Ray starts a fresh one in its place), and the last agent runs on the other one."""
    from kvshare.serve.ray_cluster import deploy, ray_session, undeploy
    from kvshare.serve.run import free_port

    rows = []
    with ray_session(None, max(os.cpu_count() or 1, int(2 * spec.cpus + 0.999))):
        port = free_port()
        deploy(replace(spec, router="affinity"), 2, "127.0.0.1", port)
        try:
            for w in range(workflows):
                rows.append(asyncio.run(_failover(f"http://127.0.0.1:{port}", workload, w)))
        finally:
            undeploy(local=False)
    return rows


async def _failover(base: str, workload: Any, w: int) -> FailoverRow:
    import ray

    last = workload.n_agents - 1
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        calls = await _workflow(client, model, workload, w, agents=last)
        ok = [c for c in calls if "error" not in c]
        home = ok[-1]["replica"] if ok else ""
        actor = f"SERVE_REPLICA::kvshare#ReplicaServer#{home}"
        ray.kill(ray.get_actor(actor, namespace="serve"), no_restart=True)
        outputs = [c.get("text", "") for c in calls]
        body = {"model": model, "messages": workload.messages(last, outputs, item=w),
                "max_tokens": workload.output_len, "temperature": 0}  # fmt: skip
        head = {"X-KVShare-Session": f"wf{w}", "X-KVShare-Agent": workload.agent_name(last)}
        r = await client.post("/v1/chat/completions", json=body, headers=head)
    usage = r.json().get("usage", {}) if r.status_code == 200 else {}
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    later = ok[1:]  # the first agent of a workflow has nothing of its own to reuse
    return FailoverRow(
        workflow=w, home=home, after=r.headers.get("x-kvshare-replica", ""),
        earlier_reuse=sum(c["cached"] for c in later) / max(1, sum(c["prompt"] for c in later)),
        failover_reuse=cached / max(1, usage.get("prompt_tokens", 0)),
        errors=len(calls) - len(ok) + (r.status_code != 200),
    )  # fmt: skip


def markdown_failover(rows: list[FailoverRow]) -> str:
    columns = ["workflow", "replica before / after", "reuse of agents 2..n-1 before",
               "last agent's reuse after the kill", "errors"]  # fmt: skip
    return _table(columns, [
        f"| {r.workflow} | {r.home} / {r.after} | {r.earlier_reuse:.1%} | "
        f"{r.failover_reuse:.1%} | {r.errors} |\n"
        for r in rows
    ])  # fmt: skip
