"""``kvshare bench``: side-by-side benchmarks of the reuse modes (workflows, teams, tiers,
kernels, overheads) and the notebooks' figures."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kvshare.cli import bench_more
from kvshare.cli.common import TEAMS, WORKLOADS, add_model_args, engine_for
from kvshare.config import IMPLEMENTED_MODES
from kvshare.errors import KVShareError


def add_parser(sub: Any) -> None:
    """Register ``kvshare bench`` on the subparsers ``sub``."""
    bench = sub.add_parser("bench", help="side-by-side benchmark of reuse modes")
    add_model_args(bench)
    bench.add_argument(
        "target",
        nargs="?",
        choices=WORKLOADS,
        help="what to benchmark (same as --workload); `kvshare bench kernels`: the kernel ops",
    )
    bench.add_argument(
        "--workload",
        default="synthetic",
        choices=WORKLOADS,
        help="synthetic N-agent workflow, real-text QA team, the partial-prefill crossover, "
        "the per-call overhead outside the model (default model random:tiny-deep), or the "
        "kernel ops against their torch reference (8B shapes), or the LangChain wrapper's "
        "cost per call (ChatKVShare vs Engine.chat), or N concurrent streams against the "
        "same calls one at a time, or N parallel branches over one document (its prefix "
        "held once against a copy per branch), or the routing simulator (policies over "
        "simulated replicas; no model), or live replicas on a local Ray (affinity vs Ray's router)",
    )
    bench.add_argument(
        "--profile",
        action="store_true",
        help="per-call stage times (device synchronised at stage edges): JSON + stacked bars",
    )
    bench.add_argument(
        "--lengths",
        default=None,
        help="overhead: shared-input lengths (default 256,512,1024,2048); kernels: run "
        "lengths (default 256,1024,4096,8192 on CUDA, 256,1024 on CPU)",
    )
    bench.add_argument("--modes", default=",".join(IMPLEMENTED_MODES), help="comma-separated")
    bench.add_argument(
        "--streams",
        default="1,2,4,8",
        help="concurrent: stream counts; branches: branch counts (comma-separated)",
    )
    bench.add_argument(
        "--chunk",
        default="0",
        help="concurrent: prefill_chunk_tokens of the together runs, e.g. 0,256 (0: whole)",
    )
    bench.add_argument(
        "--every",
        default="0",
        help="concurrent: decode_every_ms of the together runs, e.g. 0,100 (with every --chunk)",
    )
    bench.add_argument(
        "--replicas", default="2,4,8,16,32,64",
        help="routing: simulated replica counts; replicas: the first is R (live)",
    )  # fmt: skip
    bench.add_argument("--threshold", type=int, default=4, help="replicas: affinity load gap")
    bench.add_argument(
        "--failover",
        action="store_true",
        help="replicas: a redis-server shared by 2 replicas; each workflow's replica is killed "
        "before its last agent, which runs on the other (its reuse through Redis)",
    )
    bench.add_argument(
        "--clients", default="1,4,16", help="serve: concurrent HTTP clients (comma-separated)"
    )
    bench.add_argument("--requests", type=int, default=4, help="serve: requests per client")
    bench.add_argument(
        "--faults", type=int, default=8, help="redis-faults: faults injected per round"
    )
    bench.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="teams: parallel branches of a superstep at once (1: one at a time, reproducible)",
    )
    bench.add_argument(
        "--items",
        type=int,
        default=None,
        help="workflows per pass (qa: questions, default 12; synthetic: shared inputs, default "
        "1; rag/debate: questions, code: problems, default 3; routing: workflows per "
        "replica, default 160)",
    )
    bench.add_argument("--item-offset", type=int, default=0, help="qa: first question")
    bench.add_argument(
        "--pareto", action="store_true", help="sweep recompute budgets / entropy gates"
    )
    bench.add_argument("--agents", type=int, default=5)
    bench.add_argument("--prefix", type=int, default=256, help="tokens of each agent's prefix")
    bench.add_argument(
        "--input",
        type=int,
        default=512,
        help="tokens of the shared input (branches: of the document)",
    )
    bench.add_argument("--output", type=int, default=64, help="max tokens per agent output")
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--no-shadow", action="store_true", help="skip fidelity measurement")
    bench.add_argument(
        "--teach",
        action="store_true",
        help="a full prefill beside every reused call teaches the anchor pool and the ratio "
        "(the figures of a system production calls are not; default: production learning)",
    )
    bench.add_argument(
        "--idle-teach",
        action="store_true",
        help="anchored modes teach their pools with full prefills while the engine is idle "
        "(EngineConfig idle_teach; use with --gap)",
    )
    bench.add_argument(
        "--gap", type=float, default=0.0, help="idle seconds after every call (tool time)"
    )
    bench.add_argument(
        "--anchor-budget-mib", type=float, default=256, help="anchor pool byte budget (MiB)"
    )
    bench.add_argument(
        "--anchor-storage",
        default="float16",
        choices=["float32", "float16", "int8"],
        help="dtype the anchor pool stores deviations in",
    )
    bench.add_argument(
        "--fractions",
        default="0.25,0.5,1.0",
        help="tiers: device-tier budgets as shares of the workflow's working set",
    )
    bench.add_argument(
        "--gap-ms", type=float, default=50.0, help="tiers: time between two agents' turns"
    )
    bench.add_argument(
        "--lowers",
        default="disk,none",
        help="tiers: what sits below the device tier (disk: misses load; none: they recompute)",
    )
    bench.add_argument(
        "--team",
        choices=TEAMS,
        default=None,
        help="tiers: run a reference team under pressure (first --fractions share) instead",
    )
    bench.add_argument("--out", default="bench-out", help="directory for JSON/markdown/PNG")
    bench.add_argument(
        "--plots",
        action="store_true",
        help="write the notebooks' key figures (reuse, Pareto, stages, tiers) to --out "
        "(default docs/) instead of running a workload",
    )
    bench.add_argument(
        "--figures",
        default="teams,topologies,pareto,stages,tiers",
        help="--plots: which figures to (re)draw",
    )
    bench.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvshare.bench import report
    from kvshare.bench.harness import run_bench

    args.workload = args.target or args.workload
    if not 0 <= args.gap <= 3600:
        raise KVShareError(f"--gap must be between 0 and 3600 seconds, got {args.gap}")
    if args.workload == "kernels":
        return bench_more.run_kernels(args)
    if args.workload == "routing":
        return bench_more.run_routing(args)
    if args.workload == "replicas":
        return bench_more.run_replicas(args)
    engine = engine_for(args)
    if args.plots:
        from kvshare.bench.plots import write_plots

        out = Path("docs" if args.out == "bench-out" else args.out)
        names = tuple(n.strip() for n in args.figures.split(",") if n.strip())
        print(f"wrote {write_plots(engine, out, names=names)} and its figures")
        return 0
    if args.workload in TEAMS:
        return bench_more.run_team(args, engine)
    if args.workload == "tiers":
        return bench_more.run_tiers(args, engine)
    if args.workload == "overhead":
        return bench_more.run_overhead(args, engine)
    if args.workload in ("concurrent", "branches"):
        return bench_more.run_concurrent(args, engine)
    if args.workload == "serve":
        return bench_more.run_serve(args, engine)
    if args.workload == "redis-faults":
        return bench_more.run_redis_faults(args, engine)
    if args.workload == "wrapper":
        from kvshare.bench.wrapper import measure as wrapper_cost

        cost = wrapper_cost(engine)
        print(f"model {engine.loaded.source} on {engine.device}")
        print(" | ".join(f"{k} {v:.2f}" for k, v in cost.items()))
        return 0
    if args.workload == "crossover":
        from kvshare.bench.crossover import measure

        print("| selected share | masked / causal prefill time |\n|---|---|")
        for ratio, rel in measure(engine, length=args.input):
            print(f"| {ratio:.0%} | {rel:.2f} |")
        return 0
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in IMPLEMENTED_MODES]
    if bad:
        raise KVShareError(
            f"unknown or unimplemented mode(s) {bad}; choose from {IMPLEMENTED_MODES}"
        )
    workload = _workload(args, engine)
    out = Path(args.out)
    if args.pareto:
        import json

        from kvshare.bench.pareto import plot, sweep

        points = sweep(engine, workload)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{workload.name}-pareto.json").write_text(
            json.dumps([p.model_dump() for p in points], indent=1)
        )
        plot(points, out / f"{workload.name}-pareto.png", f"{workload.name}: reuse vs KL")
        print(
            "| mode | setting | realized recompute | token reuse | mean KL | top-1 | task score |"
        )
        print("|---|---|---|---|---|---|---|")
        for p in points:
            print(
                f"| {p.mode} | {p.setting} | {p.realized_ratio:.1%} | {p.token_reuse:.1%} | "
                f"{p.mean_kl or 0:.4f} | "
                f"{p.top1_agree or 0:.1%} | {p.task_score or 0:.1f} |"
            )
        return 0
    pool = {
        "anchor_budget_bytes": int(args.anchor_budget_mib * 2**20),
        "anchor_storage": args.anchor_storage,
        **({"idle_teach": True} if args.idle_teach else {}),
    }
    options = {m: {**(pool if m in ("anchor", "kvshare") else {})} for m in ["full", *modes]}
    if args.profile:
        options = {m: {**o, "profile": True} for m, o in options.items()}
    shadow, teach = not args.no_shadow, args.teach
    rep = run_bench(
        engine, workload, modes, args.repeats, shadow, options=options, teach=teach, gap_s=args.gap
    )
    paths = report.write(rep, out)
    print(report.markdown(rep))
    if args.profile:
        from kvshare.bench import profile_report

        paths.update(profile_report.write(rep, out))
        print(profile_report.markdown(rep))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _workload(args: argparse.Namespace, engine):
    from kvshare.bench.corpus import NARRATIVEQA, qa_items
    from kvshare.bench.workloads import QAWorkload

    if args.workload == "qa":
        n = args.items or 12
        items = qa_items(NARRATIVEQA)[args.item_offset : args.item_offset + n]
        return QAWorkload(items, n_agents=min(args.agents, 4), output_len=args.output)
    return bench_more.synthetic(args, engine, default_items=1)
