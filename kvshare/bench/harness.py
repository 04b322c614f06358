"""Side-by-side benchmark: several modes, one process, interleaved, same inputs."""

from __future__ import annotations

import platform
import statistics
from collections.abc import Sequence
from datetime import datetime, timezone

import torch
from pydantic import BaseModel
from tqdm.auto import tqdm

from kvshare.bench.workloads import Workload
from kvshare.engine import Engine
from kvshare.stats import CallStats, aggregate


class ModeResult(BaseModel):
    """Figures of one mode (medians over repeats per agent position)."""

    mode: str
    ttft_s: list[float]
    speedup: list[float]
    token_reuse: float
    call_reuse: float
    mean_kl: float | None
    top1_agree: float | None
    median_greedy_match: float | None
    peak_kv_bytes: int
    computed_tokens: int
    prompt_tokens: int


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


def machine_description(engine: Engine) -> str:
    dev = engine.device
    if dev.type == "cuda":
        return f"{torch.cuda.get_device_name(dev)} (CUDA)"
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def run_workflow(
    engine: Engine, workload: Workload, shadow: bool, session: str
) -> tuple[list[CallStats], list[str], int]:
    """One pass of the workflow on ``engine``; returns stats, outputs and peak stored bytes."""
    outputs: list[str] = []
    stats: list[CallStats] = []
    peak = 0
    for i in range(workload.n_agents):
        r = engine.chat(
            workload.messages(i, outputs),
            agent=workload.agent_name(i),
            session=session,
            max_new_tokens=workload.max_new_tokens,
            shadow=shadow,
        )
        outputs.append(r.text)
        stats.append(r.stats)
        peak = max(peak, engine.prefix_cache.bytes_used + engine.segments.bytes_used)
    return stats, outputs, peak


def _mode_result(
    mode: str, runs: list[list[CallStats]], peaks: list[int], full_ttft: list[float] | None
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
        computed_tokens=agg.computed_tokens,
        prompt_tokens=agg.prompt_tokens,
    )


def run_bench(
    base: Engine,
    workload: Workload,
    modes: Sequence[str],
    repeats: int = 3,
    shadow: bool = True,
    progress: bool = True,
) -> BenchReport:
    """Run ``workload`` under every mode ``repeats`` times, interleaving modes per repeat.

    Every workflow pass starts from empty stores, so repeats measure the same cold workflow.
    Shadow fidelity (a full prefill beside each call, after its first token) runs for every
    mode but ``full``.
    """
    modes = list(dict.fromkeys(["full", *modes]))
    engines = {m: base.fork(mode=m) for m in modes}
    runs: dict[str, list[list[CallStats]]] = {m: [] for m in modes}
    peaks: dict[str, list[int]] = {m: [] for m in modes}
    calls: list[dict[str, object]] = []
    bar = tqdm(
        total=repeats * len(modes) * workload.n_agents,
        disable=not progress,
        desc=f"bench {workload.name}",
        unit="call",
    )
    for rep in range(repeats):
        order = modes[rep % len(modes) :] + modes[: rep % len(modes)]
        for mode in order:
            eng = engines[mode]
            eng.reset()
            stats, _, peak = run_workflow(eng, workload, shadow and mode != "full", f"r{rep}")
            runs[mode].append(stats)
            peaks[mode].append(peak)
            calls += [{"repeat": rep, "position": i, **s.as_dict()} for i, s in enumerate(stats)]
            bar.update(len(stats))
    bar.close()
    full = _mode_result("full", runs["full"], peaks["full"], None)
    results = [full] + [_mode_result(m, runs[m], peaks[m], full.ttft_s) for m in modes[1:]]
    return BenchReport(
        workload=workload.describe(),
        modes=results,
        agents=[workload.agent_name(i) for i in range(workload.n_agents)],
        repeats=repeats,
        machine=machine_description(base),
        torch=torch.__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        calls=calls,
    )
