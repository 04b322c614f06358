"""Command line: ``kvshare demo``, ``kvshare bench``, ``kvshare chat``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvshare.config import IMPLEMENTED_MODES
from kvshare.errors import KVShareError

TEAMS = ["rag", "debate", "code"]
WORKLOADS = ["synthetic", "qa", "crossover", "overhead", "kernels", "wrapper", "tiers", *TEAMS]


def _engine(args: argparse.Namespace):
    from kvshare import Engine, EngineConfig

    model = args.model
    if model is None and getattr(args, "workload", None) in ("overhead", "wrapper"):
        model = "random:tiny-deep"  # arithmetic negligible: what is left is overhead
    return Engine.from_pretrained(
        model,
        device=args.device,
        dtype=args.dtype,
        config=EngineConfig(mode=getattr(args, "mode", "kvshare")),
    )


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="local HF dir, .gguf, or random:SHAPE (random weights of a real shape, for "
        "timing: llama-8b, llama-1b, qwen2-7b, smollm2-135m, tiny-deep); default: embedded",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16")


def cmd_demo(args: argparse.Namespace) -> int:
    from kvshare.demo import run_demo, run_team_demo

    if args.workflow:
        run_team_demo(_engine(args), args.workflow, items=args.items, out=sys.stdout)
        return 0
    run_demo(_engine(args), max_new_tokens=args.max_new_tokens, out=sys.stdout)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from kvshare.bench import report
    from kvshare.bench.harness import run_bench

    args.workload = args.target or args.workload
    if args.workload == "kernels":
        return _kernels(args)
    engine = _engine(args)
    if args.plots:
        from kvshare.bench.plots import write_plots

        out = Path("docs" if args.out == "bench-out" else args.out)
        names = tuple(n.strip() for n in args.figures.split(",") if n.strip())
        print(f"wrote {write_plots(engine, out, names=names)} and its figures")
        return 0
    if args.workload in TEAMS:
        return _team_bench(args, engine)
    if args.workload == "tiers":
        return _tiers(args, engine)
    if args.workload == "overhead":
        return _overhead(args, engine)
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
    }
    options = {m: {**(pool if m in ("anchor", "kvshare") else {})} for m in ["full", *modes]}
    if args.profile:
        options = {m: {**o, "profile": True} for m, o in options.items()}
    rep = run_bench(
        engine, workload, modes, repeats=args.repeats, shadow=not args.no_shadow, options=options
    )
    paths = report.write(rep, out)
    print(report.markdown(rep))
    if args.profile:
        from kvshare.bench import profile_report

        paths.update(profile_report.write(rep, out))
        print(profile_report.markdown(rep))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _team_bench(args: argparse.Namespace, engine) -> int:
    from kvshare.agents.teams import get_team
    from kvshare.bench import teams

    team = get_team(args.workload)
    items = team.items(args.items or team.default_items, args.item_offset)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if args.modes == ",".join(IMPLEMENTED_MODES):
        modes = ["full", "prefix", "kvshare"]  # the comparison, unless asked
    rep = teams.run_team_bench(engine, team, items, modes, shadow=not args.no_shadow)
    paths = teams.write(rep, Path(args.out))
    print(teams.markdown(rep))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _tiers(args: argparse.Namespace, engine) -> int:
    import json

    from kvshare.bench import tiers
    from kvshare.bench.harness import machine_description

    fractions = [float(x) for x in args.fractions.split(",") if x.strip()]
    if not fractions or min(fractions) <= 0:
        raise KVShareError(f"--fractions wants positive shares like 0.25,0.5; got {args.fractions}")
    lowers = [x.strip() for x in args.lowers.split(",") if x.strip()]
    if not lowers or set(lowers) - set(tiers.LOWERS):
        raise KVShareError(f"--lowers wants some of {','.join(tiers.LOWERS)}; got {args.lowers}")
    if args.team:
        return _team_tiers(args, engine, fractions[0], lowers)
    wl = _synthetic(args, engine, default_items=6)
    total, rows, timelines = tiers.measure(
        engine, wl, fractions, gap_s=args.gap_ms / 1000, lowers=lowers
    )
    warm = tiers.precompute_gain(engine, wl)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = tiers.markdown(total, rows, machine_description(engine))
    text += "\n" + tiers.warm_markdown(warm, "kvshare")
    (out / "tiers.md").write_text(text)
    (out / "tiers.json").write_text(json.dumps([r.model_dump() for r in rows], indent=1))
    for fraction, timeline in timelines.items():
        name = f"tiers-timeline-{int(fraction * 100)}.png"
        title = (
            f"workflow policy, device tier {fraction:.0%} of the working set: calls and tier events"
        )
        tiers.plot_timeline(timeline, out / name, title)
    print(text)
    return 0


def _team_tiers(args: argparse.Namespace, engine, fraction: float, lowers: list[str]) -> int:
    """A reference team under memory pressure, and its agents' first calls with their static
    prompts precomputed (ahead of the run, and live by the prefetcher) vs not."""
    from kvshare.agents.teams import get_team
    from kvshare.bench import team_tiers, tiers
    from kvshare.bench.harness import machine_description

    team = get_team(args.team)
    items = team.items(args.items or team.default_items, args.item_offset)
    total, rows = team_tiers.team_pressure(engine, team, items, fraction, lowers)
    text = f"Team `{team.name}`, {len(items)} item(s).\n\n" + tiers.markdown(
        total, rows, machine_description(engine), over="every call"
    )
    colds = {m: team_tiers.cold_run(engine, team, items, m) for m in ("prefix", "kvshare")}
    for mode, cold in colds.items():
        gain = team_tiers.precompute_gain(engine, team, items, mode, cold)
        text += "\n" + tiers.warm_markdown(gain, mode, "ahead of the run")
    live, cold_s, live_s = team_tiers.live_prefetch(engine, team, items, cold=colds["kvshare"])
    text += "\n" + tiers.warm_markdown(live, "kvshare", "by the prefetcher during the run")
    text += f"\nWall time of the run: prefetcher off {cold_s:.1f} s, on {live_s:.1f} s.\n"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"tiers-team-{team.name}.md").write_text(text)
    print(text)
    return 0


def _overhead(args: argparse.Namespace, engine) -> int:
    import json

    from kvshare.bench.overhead import markdown, measure

    lengths = _lengths(args.lengths or "256,512,1024,2048")
    modes = [m.strip() for m in args.modes.split(",") if m.strip() and m.strip() != "anchor"]
    rows = measure(engine, lengths, modes=modes, items=args.items or 2, agents=args.agents)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.json").write_text(json.dumps([r.model_dump() for r in rows], indent=1))
    print(f"model {engine.loaded.source} on {engine.device}\n")
    print(markdown(rows))
    return 0


def _lengths(text: str) -> list[int]:
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        lengths = []
    if not lengths or min(lengths) < 1:
        raise KVShareError(f"--lengths wants positive integers like 256,1024; got {text!r}")
    return lengths


def _kernels(args: argparse.Namespace) -> int:
    import json

    import torch
    from tqdm.auto import tqdm

    from kvshare.bench.kernels import Shape, markdown, measure
    from kvshare.model import device_and_dtype

    device, dtype = device_and_dtype(args.device, args.dtype or "bfloat16")
    default = "256,1024,4096,8192" if device.type == "cuda" else "256,1024"
    lengths = _lengths(args.lengths or default)
    bar = tqdm(total=4 * len(lengths), desc="kernels", unit="op")
    rows = measure(lengths, device, Shape(dtype=dtype), progress=lambda _: bar.update())
    bar.close()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    text = markdown(rows, f"{name}, {str(dtype).replace('torch.', '')}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels.json").write_text(json.dumps([r.model_dump() for r in rows], indent=1))
    (out / "kernels.md").write_text(text + "\n")
    print(text)
    return 0


def _workload(args: argparse.Namespace, engine):
    from kvshare.bench.corpus import NARRATIVEQA, qa_items
    from kvshare.bench.workloads import QAWorkload

    if args.workload == "qa":
        n = args.items or 12
        items = qa_items(NARRATIVEQA)[args.item_offset : args.item_offset + n]
        return QAWorkload(items, n_agents=min(args.agents, 4), output_len=args.output)
    return _synthetic(args, engine, default_items=1)


def _synthetic(args: argparse.Namespace, engine, default_items: int):
    from kvshare.bench.corpus import long_text
    from kvshare.bench.workloads import SyntheticWorkload

    return SyntheticWorkload(
        engine.tokenizer,
        long_text(),
        n_agents=args.agents,
        prefix_len=args.prefix,
        input_len=args.input,
        output_len=args.output,
        n_items=args.items or default_items,
    )


def cmd_chat(args: argparse.Namespace) -> int:
    engine = _engine(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": args.prompt})
    r = engine.chat(messages, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    print(r.text)
    s = r.stats
    print(
        f"[{s.prompt_tokens} prompt tokens, TTFT {s.ttft_s * 1000:.0f} ms, "
        f"{s.decode_tok_s:.1f} tok/s]",
        file=sys.stderr,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvshare", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="multi-agent workflow: full vs best mode, per agent")
    _add_model_args(demo)
    demo.add_argument("--max-new-tokens", type=int, default=48)
    demo.add_argument(
        "--workflow",
        choices=TEAMS,
        default=None,
        help="run a reference team (a LangGraph graph on ChatKVShare) under full and kvshare "
        "instead of the QA demo: rag (NarrativeQA), debate (GSM-style math), code (HumanEval)",
    )
    demo.add_argument("--items", type=int, default=None, help="--workflow: items to run")
    demo.set_defaults(func=cmd_demo)

    bench = sub.add_parser("bench", help="side-by-side benchmark of reuse modes")
    _add_model_args(bench)
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
        "cost per call (ChatKVShare vs Engine.chat)",
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
        "--items",
        type=int,
        default=None,
        help="workflows per pass (qa: questions, default 12; synthetic: shared inputs, default "
        "1; rag/debate: questions, code: problems, default 3)",
    )
    bench.add_argument("--item-offset", type=int, default=0, help="qa: first question")
    bench.add_argument(
        "--pareto", action="store_true", help="sweep recompute budgets / entropy gates"
    )
    bench.add_argument("--agents", type=int, default=5)
    bench.add_argument("--prefix", type=int, default=256, help="tokens of each agent's prefix")
    bench.add_argument("--input", type=int, default=512, help="tokens of the shared input")
    bench.add_argument("--output", type=int, default=64, help="max tokens per agent output")
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--no-shadow", action="store_true", help="skip fidelity measurement")
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
    bench.set_defaults(func=cmd_bench)

    chat = sub.add_parser("chat", help="one chat call")
    _add_model_args(chat)
    chat.add_argument("prompt")
    chat.add_argument("--system", default=None)
    chat.add_argument("--mode", default="kvshare", choices=IMPLEMENTED_MODES)
    chat.add_argument("--max-new-tokens", type=int, default=128)
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.set_defaults(func=cmd_chat)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KVShareError as exc:
        print(f"kvshare: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
