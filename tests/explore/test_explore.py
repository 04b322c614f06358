"""kvshare.explore: what the exploration notebooks measure and draw, on a tiny random model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kvshare.bench.corpus import long_text
from kvshare.bench.workloads import SyntheticWorkload
from kvshare.engine.stats import CallStats, MessageReuse
from kvshare.explore import fidelity as ef
from kvshare.explore import plots as ep
from kvshare.explore import reuse as ex
from kvshare.explore import time as et

from factories import team

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wl(tokenizer) -> SyntheticWorkload:
    return SyntheticWorkload(
        tokenizer, long_text(), n_agents=3, prefix_len=16, input_len=48, output_len=3, n_items=2
    )


@pytest.fixture(scope="module")
def wl5(tokenizer) -> SyntheticWorkload:
    return SyntheticWorkload(
        tokenizer, long_text(), n_agents=5, prefix_len=16, input_len=48, output_len=2
    )


@pytest.mark.parametrize("mode", ["full", "prefix", "blend", "kvshare"])
def test_message_reuse_partitions_every_call_by_message(tiny_engine, mode):
    eng = tiny_engine.fork(mode=mode)
    reader = eng.chat(team("reader"), agent="reader", max_new_tokens=2)
    again = eng.chat(team("reader"), agent="reader", max_new_tokens=2)
    judge = eng.chat(team("judge", extra=[{"role": "assistant", "content": reader.text}]),
                     agent="judge", max_new_tokens=2)  # fmt: skip
    for s in (reader.stats, again.stats, judge.stats):
        m = s.message_reuse
        assert [x.message for x in m] == [*range(len(m) - 1), -1] and m[-1].role == "generation"
        assert m[0].start == 0 and m[-1].end == s.prompt_tokens
        assert all(a.end == b.start for a, b in zip(m, m[1:], strict=False))
        assert sum(x.prefix_hit for x in m) == s.prefix_hit_tokens
        assert sum(x.relocated for x in m) == s.relocated_tokens
        assert sum(x.recomputed for x in m) == s.recomputed_tokens
        assert sum(x.computed for x in m) == s.computed_tokens
    doc = judge.stats.message_reuse[1]
    if mode == "full":
        assert all(x.computed == x.tokens for s in (again.stats, judge.stats)
                   for x in s.message_reuse)  # fmt: skip
    else:  # the same prompt again: system prompt and document are exact-prefix hits
        assert [x.prefix_hit == x.tokens for x in again.stats.message_reuse[:2]] == [True, True]
    if mode in ("blend", "kvshare"):  # behind another role prompt, the document is relocated
        assert doc.relocated > doc.tokens // 2
        (start, end), *_ = judge.stats.relocated_runs  # a run may start before the message
        assert start < doc.start + doc.tokens // 2 < end
    else:
        assert doc.relocated == 0 and doc.prefix_hit == 0 and judge.stats.relocated_runs == ()


def test_message_kinds_follow_roles_quotes_and_documents():
    msgs = [
        {"role": "system", "content": "You are the judge."},
        {"role": "user", "content": "Passages:\n\n[1] The keeper counted ships."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "five"},
        {"role": "user", "content": "The other solver wrote:\nIt is five, I think so."},
        {"role": "tool", "content": "3 passed"},
        {"role": "user", "content": "Answer briefly."},
        {"role": "user", "content": "Some shared document text here."},
    ]
    kinds = ex.message_kinds(msgs, ["It is five, I think so.", "ok"], ["shared document text"])
    assert kinds == (
        "system prompt", "retrieved passage", "user question", "agent reply", "agent reply",
        "tool output", "instruction", "retrieved passage", "template",
    )  # fmt: skip
    rag = [msgs[0], {"role": "user", "content": "Passages:\n\n[1] x\n\nQuestion: who?"},
           {"role": "user", "content": "Quote the evidence."}]  # fmt: skip
    assert ex.message_kinds(rag, []) == (
        "system prompt",
        "retrieved passage",
        "instruction",
        "template",
    )  # the question came with the passages


def test_workload_records_attribute_reuse_to_segment_kinds(tiny_engine, wl):
    recs = ex.workload_records(ex.recording(tiny_engine, mode="kvshare"), wl, "syn")
    assert [(r.stats.session, r.position) for r in recs] == [
        (f"syn-{i}", p) for i in range(2) for p in range(3)
    ]
    assert recs[2].kinds == (
        "system prompt", "retrieved passage", "agent reply", "agent reply", "template",
    )  # fmt: skip
    kinds = ex.reuse_by_kind(recs)
    assert sum(k.prompt for k in kinds.values()) == sum(r.stats.prompt_tokens for r in recs)
    assert kinds["retrieved passage"].relocated > 0  # agents 1, 2 relocate the shared input
    assert kinds["system prompt"].prefix_hit >= 3 * 16 - 3  # item 2: own prefixes hit
    assert kinds["template"].relocated == 0
    agents = ex.reuse_by(recs, lambda r: r.stats.agent or "")
    assert list(agents) == [wl.agent_name(i) for i in range(3)]
    assert agents[wl.agent_name(0)].rate < agents[wl.agent_name(2)].rate
    full = ex.reuse_by_kind(ex.workload_records(ex.recording(tiny_engine, mode="full"), wl, "f"))
    assert all(k.computed == k.prompt for k in full.values())
    assert "retrieved passage" in ex.fmt_reuse(kinds)


def test_topologies_wire_replies_and_star_hub_hits_its_own_prefix(tiny_engine, wl5):
    for name, steps in ex.TOPOLOGIES.items():
        recs = ex.run_topology(tiny_engine, steps, wl5, name, mode="prefix")
        assert len(recs) == len(steps)
        for rec, step in zip(recs, steps, strict=True):
            assert rec.kinds.count("agent reply") == len(step.sees)
            assert rec.stats.agent == f"agent{step.agent}"
        if name == "star":  # the hub again: its prefix and the shared input are cached
            sys_msg, doc = recs[-1].stats.message_reuse[:2]
            assert sys_msg.prefix_hit == sys_msg.tokens and doc.prefix_hit == doc.tokens


def test_kv_error_is_zero_for_exact_reuse_and_grows_above_layer_0(tiny_engine):
    exact = ex.recording(tiny_engine, mode="prefix")
    exact.chat(team("reader"), agent="r", session="s", max_new_tokens=2)
    exact.chat(team("reader", extra=[{"role": "user", "content": "Why?"}]), session="s",
               max_new_tokens=2)  # fmt: skip
    recs = ex.records_of(exact, "exact")
    assert recs[1].stats.prefix_hit_tokens > 0
    assert float(ef.kv_error(exact, recs[1]).max()) < 1e-4
    moved = ex.recording(tiny_engine, mode="blend", recompute_ratio=0.0, sink_tokens=0)
    moved.chat(team("reader"), agent="r", max_new_tokens=2)
    moved.chat(team("a much longer role prompt for the judge"), agent="j", max_new_tokens=2)
    rec = ex.records_of(moved, "moved")[1]
    doc = rec.stats.message_reuse[1]
    assert doc.relocated > 0
    err = ef.kv_error(moved, rec)
    assert err is not None and err.shape == (2, rec.stats.prompt_tokens)
    span = err[:, doc.start : doc.start + doc.relocated]
    assert float(span[0].max()) < 1e-4  # layer 0: a token's KV is its own, RoPE re-rotated
    assert float(span[1].mean()) > 1e-3  # layer 1 saw another context
    assert ef.kv_error(ex.recording(tiny_engine, mode="full"), rec) is None


def test_error_profiles_by_layer_and_run_start(tiny_engine, wl):
    errors = ef.kv_errors(tiny_engine, wl, ["prefix", "blend"], shadow=False)
    assert {e.mode for e in errors} == {"prefix", "blend"} and len(errors) == 12
    layers = ef.layer_profile(errors)
    assert layers["prefix"].shape == (2,) and float(layers["prefix"].max()) < 1e-4
    assert float(layers["blend"][1]) > float(layers["prefix"][1])
    starts = ef.run_start_profile(errors, width=8)
    assert set(starts) == {"blend"} and starts["blend"].shape == (2, 8)  # prefix relocates none


def test_recompute_budget_trades_reuse_for_recompute(tiny_engine, wl):
    lo, hi = ef.sweep(tiny_engine, wl, "blend", "recompute_ratio", [0.0, 0.5], shadow=False)
    assert (lo.setting, hi.setting) == ("recompute_ratio=0.0", "recompute_ratio=0.5")
    assert hi.realized > lo.realized + 0.3 and hi.reuse < lo.reuse
    assert lo.kl is None and lo.score is None
    small = SyntheticWorkload(wl.tokenizer, wl.corpus, n_agents=2, prefix_len=16, input_len=48,
                              output_len=2)  # fmt: skip
    pts = ef.pareto_points(tiny_engine, small, ratios=(0.0, 0.5), gammas=(0.3,))
    assert [(p.mode, p.setting) for p in pts] == [
        ("prefix", "exact prefix"), ("blend", "ratio=0.0"), ("kvshare", "ratio=0.0"),
        ("blend", "ratio=0.5"), ("kvshare", "ratio=0.5"), ("kvshare", "match=0.3"),
        ("anchor", "gamma=0.3"),
    ]  # fmt: skip
    assert pts[0].kl is not None and pts[0].kl < 1e-6 and pts[0].top1 == 1.0
    assert "exact prefix" in ef.fmt_points(pts)


def test_learning_curve_grows_the_anchor_pool(tiny_engine, wl):
    curve = ef.learning_curve(tiny_engine, wl, "kvshare")
    assert [p.item for p in curve] == [0, 1]
    assert 0 < curve[0].anchors_bytes <= curve[1].anchors_bytes
    assert curve[1].reuse > curve[0].reuse  # item 2: own prefixes hit as well


def test_stage_profile_and_tier_runs(tiny_engine, wl):
    prof = et.stage_profile(tiny_engine, wl, ("kvshare",))
    assert list(prof.ms) == ["full", "kvshare"] and len(prof.agents) == 3
    assert prof.ms["kvshare"][1]["prefill"] > 0 and prof.ms["kvshare"][1]["plan"] > 0
    assert "kvshare · " in et.fmt_stages(prof)
    runs = et.tier_runs(tiny_engine, wl, fraction=0.25, gap_s=0.0, policies=("workflow", "lru"))
    assert runs.working_set > 0 and runs.device_bytes == max(1, int(0.25 * runs.working_set))
    flow, lru = runs.runs["workflow"], runs.runs["lru"]
    assert len(flow.ttft_s) == 6 and flow.outputs == lru.outputs  # tiers never change outputs
    assert len(flow.timeline.calls) == 6 and any(e[0] == "put" for e in flow.timeline.events)
    assert "workflow" in et.fmt_tiers(runs)


def _record(kinds: tuple[str, ...]) -> ex.CallRecord:
    msgs = (MessageReuse(0, "system", 0, 10, 10, 0, 0), MessageReuse(1, "user", 10, 50, 0, 30, 5),
            MessageReuse(-1, "generation", 50, 54, 0, 0, 0))  # fmt: skip
    stats = CallStats("kvshare", 54, 10, 30, 5, 14, 2, 0.1, 10.0, "length", agent="a",
                      message_reuse=msgs)  # fmt: skip
    return ex.CallRecord("r", "kvshare", 1, stats, kinds, (), ())


def _check(fig, path) -> None:
    titles = [fig.get_suptitle()] + [ax.get_title() for ax in fig.axes]
    assert any(titles)
    data_axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert data_axes[0].get_xlabel() and data_axes[0].get_ylabel()
    assert all(ax.get_xlabel() or ax.get_ylabel() for ax in data_axes)  # twins share one axis
    assert path.stat().st_size > 2000 and fig._repr_png_()[:4] == b"\x89PNG"


def test_every_figure_has_a_title_labelled_axes_and_a_png(tmp_path):
    reuse = ex.Reuse(100, 20, 50, 10, 30)
    point = ef.Point("kvshare", "ratio=0.1", 0.7, 0.1, 0.01, 0.9, 30.0, 12.0, 0)
    anchor = point._replace(mode="anchor", setting="gamma=0.3", reuse=0.5)
    err = ef.KVError("kvshare", _record(("system prompt", "retrieved passage", "template")),
                     torch.rand(3, 54))  # fmt: skip
    prof = et.StageProfile(["a0", "a1"], {"full": [{"prefill": 5.0, "decode": 9.0}] * 2})
    events = [("put", 0.1, "", "device"), ("demote", 0.2, "device", "disk")]
    timeline = type("T", (), {"calls": [("a0", 0.0, 0.1), ("a1", 0.15, 0.3)], "events": events})
    run = et.TierRun("workflow", ["a0", "a1"], [0.1, 0.12], timeline, 0, 1, ["x", "y"])
    figures = {
        "bars": lambda p: ep.plot_reuse_bars({"kvshare": {"a": reuse}}, "t", p),
        "kinds": lambda p: ep.plot_kind_reuse({"kvshare": {"system prompt": reuse}}, "t", p),
        "curve": lambda p: ep.plot_learning([ef.CurvePoint("kvshare", 0, 0.5, 0.1, None, 9)], p),
        "sweeps": lambda p: ep.plot_sweeps({"recompute_ratio": [point]}, "t", p),
        "pareto": lambda p: ep.plot_pareto([point, anchor], "t", p),
        "error": lambda p: ep.plot_error_map(err, p),
        "layers": lambda p: ep.plot_layer_profile({"kvshare": torch.rand(3)}, p),
        "starts": lambda p: ep.plot_run_starts({"kvshare": torch.rand(3, 8)}, p),
        "stages": lambda p: ep.plot_stage_profile(prof, p),
        "timeline": lambda p: ep.plot_tier_timeline(run, p),
        "ttft": lambda p: ep.plot_tier_ttft(et.TierRuns(100, 25, {"workflow": run}), p),
    }
    for name, draw in figures.items():
        path = tmp_path / f"{name}.png"
        _check(draw(path), path)


TINY = {
    "01_reuse_rates.ipynb": dict(
        MODES=("kvshare",), TEAMS={"rag": 1, "debate": 1, "code": 1}, AGENTS=3, PREFIX=16,
        INPUT=48, OUTPUT=2, ITEMS=2, CURVE_AGENTS=2, CURVE_ITEMS=2, RATIOS=(0.0,),
        TARGET_KLS=(0.02,), NEIGHBOURS=(4,), GAMMAS=(0.3,),
    ),
    "02_fidelity_tradeoff.ipynb": dict(
        QA_AGENTS=2, OUTPUT=2, RATIOS=(0.0,), GAMMAS=(0.3,), ERROR_MODES=("kvshare",)
    ),
    "03_where_time_goes.ipynb": dict(
        AGENTS=3, PREFIX=16, INPUT=48, OUTPUT=2, ITEMS=1, TIER_ITEMS=2, GAP_S=0.0,
        PROFILE_MODES=("kvshare",),
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(TINY))
def test_notebooks_run_top_to_bottom_on_a_tiny_model(name, tiny_dirs):
    """Every code cell, in order, with the parameters cell's values made tiny (the notebooks'
    own run on the embedded model is ``make notebooks``)."""
    nb = json.loads((ROOT / "notebooks" / name).read_text())
    cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert "parameters" in cells[0]["metadata"].get("tags", [])
    scope: dict[str, object] = {}
    for k, cell in enumerate(cells):
        exec(compile("".join(cell["source"]), f"{name}[{k}]", "exec"), scope)  # noqa: S102
        if k == 0:
            scope.update(TINY[name], MODEL=str(tiny_dirs["llama"]))
    figures = [v for v in scope.values() if isinstance(v, ep.ShownFigure)]
    assert scope["base"].loaded.source and not figures  # cells end on figures, not names
