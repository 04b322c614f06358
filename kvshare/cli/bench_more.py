"""``kvshare bench`` workloads with their own reports: teams, memory tiers, the per-call
overhead and the kernel ops."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from kvshare.cli.common import engine_for, parse_lengths
from kvshare.config import IMPLEMENTED_MODES
from kvshare.errors import KVShareError


def run_team(args: argparse.Namespace, engine) -> int:
    from kvshare.agents.teams import get_team
    from kvshare.bench import teams

    team = get_team(args.workload)
    items = team.items(args.items or team.default_items, args.item_offset)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if args.modes == ",".join(IMPLEMENTED_MODES):
        modes = ["full", "prefix", "kvshare"]  # the comparison, unless asked
    rep = teams.run_team_bench(
        engine,
        team,
        items,
        modes,
        not args.no_shadow,
        idle_teach=args.idle_teach,
        gap_s=args.gap,
        max_concurrency=args.concurrency,
    )
    paths = teams.write(rep, Path(args.out))
    print(teams.markdown(rep))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def run_tiers(args: argparse.Namespace, engine) -> int:
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
        return run_team_tiers(args, engine, fractions[0], lowers)
    wl = synthetic(args, engine, default_items=6)
    total, rows, timelines = tiers.measure(
        engine, wl, fractions, gap_s=args.gap_ms / 1000, lowers=lowers
    )
    warm = tiers.precompute_gain(engine, wl)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = tiers.markdown(total, rows, machine_description(engine))
    text += "\n" + tiers.warm_markdown(warm, "kvshare")
    (out / "bench-tiers.md").write_text(text)
    (out / "bench-tiers.json").write_text(json.dumps([r.model_dump() for r in rows], indent=1))
    for fraction, timeline in timelines.items():
        name = f"tiers-timeline-{int(fraction * 100)}.png"
        title = (
            f"workflow policy, device tier {fraction:.0%} of the working set: calls and tier events"
        )
        tiers.plot_timeline(timeline, out / name, title)
    print(text)
    return 0


def run_team_tiers(args: argparse.Namespace, engine, fraction: float, lowers: list[str]) -> int:
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


def run_overhead(args: argparse.Namespace, engine) -> int:
    from kvshare.bench.overhead import markdown, measure

    lengths = parse_lengths(args.lengths or "256,512,1024,2048")
    modes = [m.strip() for m in args.modes.split(",") if m.strip() and m.strip() != "anchor"]
    rows = measure(engine, lengths, modes=modes, items=args.items or 2, agents=args.agents)
    return _write_rows(args, engine, "overhead", rows, markdown(rows))


def _write_rows(args: argparse.Namespace, engine, name: str, rows: list, table: str) -> int:
    """``<out>/<name>.json`` with ``rows``; prints the model and ``table``."""
    import json

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps([r.model_dump() for r in rows], indent=1))
    print(f"model {engine.loaded.source} on {engine.device}\n")
    print(table)
    return 0


def run_concurrent(args: argparse.Namespace, engine) -> int:
    """``--workload concurrent`` or ``branches``."""
    from kvshare.bench import branches
    from kvshare.bench.concurrent import markdown, measure

    streams = parse_lengths(args.streams, "--streams")
    if args.workload == "branches":
        from kvshare.bench.branches_graph import markdown_graph, measure_graph

        found = branches.measure(engine, tuple(streams), args.input, args.output)
        _write_rows(args, engine, "branches", found, branches.markdown(found))
        doc = branches.document(engine, args.input)
        graphs = [measure_graph(engine, doc, branches.questions(n)) for n in streams]
        return _write_rows(args, engine, "branches_graph", graphs, markdown_graph(graphs))
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    mode = modes[0] if len(modes) == 1 else "full"  # default: the engine alone, no reuse
    chunks = parse_lengths(args.chunk, "--chunk", least=0)
    every = parse_lengths(args.every, "--every", least=0)
    variants = [(c, float(e)) for c in chunks for e in every]
    rows = measure(engine, streams, mode, args.output, args.input, args.repeats, variants)
    return _write_rows(args, engine, "concurrent", rows, markdown(rows))


def run_serve(args: argparse.Namespace, engine) -> int:
    """HTTP overhead per call (``--items`` calls, default 40) and ``--clients`` x
    ``--requests`` streamed requests of ``--output`` tokens against a serial replay; mode:
    the one ``--modes`` names, else prefix."""
    from kvshare.bench.serve import markdown, measure_load, measure_overhead, serial_replies

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    engine = engine.fork(mode=modes[0] if len(modes) == 1 else "prefix")
    clients = parse_lengths(args.clients, "--clients")
    overhead = measure_overhead(engine.fork(), args.items or 40)
    expected = serial_replies(engine, max(clients) * args.requests, args.output)
    rows = [measure_load(engine, c, args.requests, args.output, expected) for c in clients]
    table = markdown(overhead, rows)
    _write_rows(args, engine, "serve", [overhead, *rows], table)
    return 0 if all(r.errors == 0 and r.mismatches == 0 for r in rows) else 1


def run_redis_faults(args: argparse.Namespace, engine) -> int:
    """Replicas A and B sharing a real redis-server under injected faults (``--items``
    rounds, default 100; ``--agents`` per workflow, B runs the last); exit 1 unless no call
    failed and no wrong KV was served (``kvshare.bench.redis_faults``)."""
    import json

    from kvshare.bench.redis_faults import markdown, measure

    rep = measure(
        engine, rounds=args.items or 100, faults_per_round=args.faults,
        agents=max(2, args.agents), prefix_len=args.prefix,
        input_len=args.input, output_len=args.output,
    )  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "redis-faults.json").write_text(json.dumps(rep.summary(), indent=1))
    print(f"model {engine.loaded.source} on {engine.device}\n\n{markdown(rep)}")
    return 0 if rep.failed_calls == 0 and rep.wrong_kv_served == 0 else 1


def run_kernels(args: argparse.Namespace) -> int:
    import json

    import torch
    from tqdm.auto import tqdm

    from kvshare.bench.kernels import Shape, markdown, measure
    from kvshare.model.load import device_and_dtype

    device, dtype = device_and_dtype(args.device, args.dtype or "bfloat16")
    default = "256,1024,4096,8192" if device.type == "cuda" else "256,1024"
    lengths = parse_lengths(args.lengths or default)
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


def run_replicas(args: argparse.Namespace) -> int:
    """``--workload replicas``: ``--items`` (default 8) synthetic workflows at once on one
    replica, then R (the first ``--replicas``) behind Ray's router and the affinity router."""
    from kvshare.bench.replicas import markdown, measure
    from kvshare.config import EngineConfig
    from kvshare.serve import ServeConfig
    from kvshare.serve.ray_app import ReplicaSpec

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    mode = modes[0] if len(modes) == 1 else "kvshare"
    replicas = parse_lengths(args.replicas, "--replicas")[0]
    args.items = args.items or 8
    workload = synthetic(args, engine_for(args), default_items=8)
    serve = ServeConfig(max_concurrent=1 << 10, max_queued_prompt_tokens=1 << 30)
    spec = ReplicaSpec(
        model=args.model, device=args.device, dtype=args.dtype, serve=serve,
        engine=EngineConfig(mode=mode), threshold=args.threshold,
    )  # fmt: skip
    if args.failover:
        return _failover(args, spec, workload)
    rows = measure(spec, workload, replicas)
    text = markdown(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "replicas.json").write_text(json.dumps([r.model_dump() for r in rows], indent=1))
    print(f"{workload.n_items} workflows x {workload.n_agents} agents, mode {mode}\n\n{text}")
    return 0 if all(r.errors == 0 for r in rows) else 1


def _failover(args: argparse.Namespace, spec: Any, workload: Any) -> int:
    """``--failover``: a local redis-server as the replicas' shared tier, a replica killed
    before each workflow's last agent (``kvshare.bench.replicas.measure_failover``)."""
    import tempfile
    from dataclasses import replace

    from kvshare.bench.local_redis import LocalRedis
    from kvshare.bench.replicas import markdown_failover, measure_failover

    redis = LocalRedis(maxmemory="2gb")
    redis.start()
    try:
        key = str(Path(tempfile.mkdtemp(prefix="kvshare-failover-")) / "shared.key")
        engine = spec.engine.with_options(shared_tier=redis.url, shared_key_file=key)
        rows = measure_failover(replace(spec, engine=engine), workload, workload.n_items)
    finally:
        redis.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "failover.json").write_text(json.dumps([r.model_dump() for r in rows], indent=1))
    print(markdown_failover(rows))
    return 0 if all(r.errors == 0 for r in rows) else 1


def run_routing(args: argparse.Namespace) -> int:
    """``--workload routing``: the routing simulator (no model is loaded)."""
    import json

    from kvshare.bench.routing import Trace, markdown, measure
    from kvshare.sched.routing import ROUTERS

    replicas = parse_lengths(args.replicas, "--replicas")
    per = args.items or 160
    rows = []
    for n in replicas:  # the trace grows with the replicas: ``per`` workflows each
        trace = Trace(workflows=per * n, agents=args.agents)
        rows += measure(trace, [n], ROUTERS.names)
    text = markdown(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "routing.json").write_text(json.dumps([r.model_dump() for r in rows], indent=1))
    print(f"{per} workflows per replica, {args.agents} agents each\n\n{text}")
    return 0


def synthetic(args: argparse.Namespace, engine, default_items: int):
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
