"""Side-by-side benchmark: several modes, one process, interleaved, same inputs."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import torch
from pydantic import BaseModel
from tqdm.auto import tqdm

from kvshare.bench.workloads import Workload
from kvshare.engine.engine import Engine
from kvshare.engine.idle import IdleStats
from kvshare.engine.stats import CallStats, aggregate


class ModeResult(BaseModel):
    """Figures of one mode; TTFT: median per agent position over items and repeats."""

    mode: str
    ttft_s: list[float]
    speedup: list[float]
    token_reuse: float
    call_reuse: float
    mean_kl: float | None
    top1_agree: float | None
    median_greedy_match: float | None
    peak_kv_bytes: int
    anchor_pool_bytes: int
    computed_tokens: int
    prompt_tokens: int
    task_score: float | None = None


class BenchReport(BaseModel):
    """Everything one ``kvshare bench`` run measured (written as JSON)."""

    workload: dict[str, object]
    modes: list[ModeResult]
    agents: list[str]
    repeats: int
    machine: str
    torch: str
    created: str
    calls: list[dict[str, object]]
    random_weights: bool = False  # timing only: fidelity and task scores are n/a
    teach: bool = False  # every reused call also taught by a full prefill (not production)
    gap_s: float = 0.0  # idle seconds after every call (a workflow's tool or think time)
    idle: dict[str, dict[str, float]] = {}  # mode -> idle-time teaching figures (idle_summary)


def machine_description(engine: Engine) -> str:
    dev = engine.device
    if dev.type == "cuda":
        return f"{torch.cuda.get_device_name(dev)} (CUDA)"
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def stored_bytes(engine: Engine) -> int:
    """KV bytes the engine holds: radix prefix cache + segment store + anchor pool."""
    return engine.memory().total


def run_workflow(
    engine: Engine,
    workload: Workload,
    shadow: bool,
    session: str,
    item: int = 0,
    teach: bool = False,
    gap_s: float = 0.0,
) -> tuple[list[CallStats], list[str], int]:
    """One item of the workflow on ``engine``; returns stats, outputs and peak stored bytes.
    shadow: measure fidelity (changes nothing); teach: a full prefill teaches each call;
    gap_s: seconds idle after each call (what idle-time teaching may use)."""
    outputs: list[str] = []
    stats: list[CallStats] = []
    peak = 0
    for i in range(workload.n_agents):
        r = engine.chat(
            workload.messages(i, outputs, item),
            agent=workload.agent_name(i),
            session=session,
            max_new_tokens=workload.max_new_tokens,
            shadow=shadow,
            teach=teach,
        )
        outputs.append(r.text)
        stats.append(r.stats)
        peak = max(peak, stored_bytes(engine))
        time.sleep(gap_s)
    return stats, outputs, peak


def idle_summary(passes: Sequence[IdleStats]) -> dict[str, float]:
    """Idle-time teaching over a mode's passes: jobs offered/taught/preempted/dropped, seconds
    on the model, its longest step, the calls that waited on it, the longest wait, and how
    many waited longer than one step."""
    delays = [d for p in passes for d in p.delays]
    step = max((p.step_s for p in passes), default=0.0)
    return {
        "offered": sum(p.offered for p in passes),
        "taught": sum(p.taught for p in passes),
        "preempted": sum(p.preempted for p in passes),
        "dropped": sum(p.dropped for p in passes),
        "busy_s": sum(p.busy_s for p in passes),
        "step_s": step,
        "waited_calls": len(delays),
        "max_wait_s": max(delays, default=0.0),
        "waits_over_a_step": sum(d > step for d in delays),
    }


def pause_teaching(engine: Engine, passes: dict[str, list[IdleStats]], mode: str) -> None:
    """Keep a pass's idle-teaching figures, then stop its pending jobs (another mode's
    engine runs next: its worker must not take the cores then)."""
    if engine.teacher is not None:
        passes.setdefault(mode, []).append(engine.teacher.stats())
        engine.teacher.clear()
        engine.teacher.drain()


def _mode_result(
    mode: str,
    runs: list[list[CallStats]],
    peaks: list[int],
    full_ttft: list[float] | None,
    scores: list[float],
    pool: int,
) -> ModeResult:
    n = len(runs[0])
    ttft = [statistics.median(run[i].ttft_s for run in runs) for i in range(n)]
    flat = [c for run in runs for c in run]
    agg = aggregate(flat)
    return ModeResult(
        mode=mode,
        ttft_s=ttft,
        speedup=[f / t if t > 0 else 0.0 for f, t in zip(full_ttft or ttft, ttft, strict=True)],
        token_reuse=agg.reuse_rate,
        call_reuse=agg.call_reuse_rate,
        mean_kl=agg.mean_kl,
        top1_agree=agg.top1_agree_rate,
        median_greedy_match=agg.median_greedy_match,
        peak_kv_bytes=max(peaks),
        anchor_pool_bytes=pool,
        computed_tokens=agg.computed_tokens,
        prompt_tokens=agg.prompt_tokens,
        task_score=100 * statistics.fmean(scores) if scores else None,
    )


def run_bench(
    base: Engine,
    workload: Workload,
    modes: Sequence[str],
    repeats: int = 3,
    shadow: bool = True,
    progress: bool = True,
    options: dict[str, dict[str, Any]] | None = None,
    teach: bool = False,
    gap_s: float = 0.0,
) -> BenchReport:
    """Run ``workload`` under every mode ``repeats`` times, interleaving modes per repeat.

    Every pass starts from empty stores (and an empty anchor pool) and runs every item in
    order, so the pool learns online within a pass; repeats measure the same cold pass.
    ``options`` maps a mode to EngineConfig options for its engine.
    Shadow fidelity (a full prefill beside each call, after its first token) runs for every
    mode but ``full``; it observes only, so the figures are what production calls get.
    ``teach``: that full prefill (run even without ``shadow``) also teaches the anchor pool
    and the ratio, as the benchmarks did before shadows were made side-effect free.
    ``gap_s``: idle seconds after every call (an engine with ``idle_teach`` teaches in them).
    """
    random_weights = bool(getattr(base.loaded, "random_weights", False))
    shadow = shadow and not random_weights  # fidelity of random weights means nothing
    modes = list(dict.fromkeys(["full", *modes]))
    engines = {m: base.fork(mode=m, **(options or {}).get(m, {})) for m in modes}
    runs: dict[str, list[list[CallStats]]] = {m: [] for m in modes}
    peaks: dict[str, list[int]] = {m: [] for m in modes}
    scores: dict[str, list[float]] = {m: [] for m in modes}
    pools: dict[str, int] = dict.fromkeys(modes, 0)
    calls: list[dict[str, object]] = []
    idle: dict[str, list[IdleStats]] = {}
    total = repeats * len(modes) * workload.n_agents * workload.n_items
    bar = tqdm(total=total, disable=not progress, desc=f"bench {workload.name}", unit="call")
    for rep in range(repeats):
        order = modes[rep % len(modes) :] + modes[: rep % len(modes)]
        for mode in order:
            eng = engines[mode]
            eng.reset()
            for item in range(workload.n_items):
                reused = mode != "full"
                stats, outs, peak = run_workflow(
                    eng, workload, shadow and reused, f"r{rep}", item, teach and reused, gap_s
                )
                runs[mode].append(stats)
                peaks[mode].append(peak)
                score = None if random_weights else workload.score(item, outs)
                if score is not None:
                    scores[mode].append(score)
                calls += [
                    {"repeat": rep, "item": item, "position": i, **s.as_dict()}
                    for i, s in enumerate(stats)
                ]
                bar.update(len(stats))
                pools[mode] = max(pools[mode], eng.memory().anchors)
            pause_teaching(eng, idle, mode)
    bar.close()
    full = _mode_result("full", runs["full"], peaks["full"], None, scores["full"], 0)
    results = [full] + [
        _mode_result(m, runs[m], peaks[m], full.ttft_s, scores[m], pools[m]) for m in modes[1:]
    ]
    return BenchReport(
        workload=workload.describe(),
        modes=results,
        agents=[workload.agent_name(i) for i in range(workload.n_agents)],
        repeats=repeats,
        machine=machine_description(base),
        torch=torch.__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        calls=calls,
        random_weights=random_weights,
        teach=teach,
        gap_s=gap_s,
        idle={m: idle_summary(p) for m, p in idle.items()},
    )
