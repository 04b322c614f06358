"""Measurement tools: random-weight shapes, stage profile, overhead bench, honest baseline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kvshare import Engine, EngineConfig
from kvshare.bench.overhead import measure
from kvshare.cli import main
from kvshare.engine.profile import BEFORE_FIRST_TOKEN
from kvshare.errors import ConfigError, ModelNotFoundError
from kvshare.model.random import SHAPES, random_config

from factories import team


def test_random_shapes_have_their_real_dimensions():
    cfg = random_config("random:llama-8b")
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads) == (32, 4096, 8)
    assert cfg.rope_parameters["rope_type"] == "llama3"
    q = random_config("random:qwen2-7b")
    assert q.model_type == "qwen2" and q.num_attention_heads == 28
    assert {"llama-8b", "llama-1b", "qwen2-7b", "smollm2-135m"} <= set(SHAPES)
    with pytest.raises(ModelNotFoundError, match="random:llama-8b"):
        random_config("random:gpt-5")


def test_a_random_engine_runs_and_says_so():
    eng = Engine.from_pretrained("random:tiny-deep", config=EngineConfig(mode="prefix"))
    assert eng.loaded.random_weights and eng.loaded.source == "random:tiny-deep"
    assert len(eng.model.model.layers) == 32
    r = eng.chat(team("planner"), max_new_tokens=2)
    assert r.stats.prompt_tokens > 50


@pytest.mark.parametrize("kwargs", [{"dtype": "floaty"}, {"dtype": "int8"}, {"device": "tpu"}])
def test_bad_device_or_dtype_is_a_named_error(kwargs):
    with pytest.raises(ConfigError):
        Engine.from_pretrained("random:tiny-deep", **kwargs)


def test_profiled_calls_time_every_stage(tiny_engine):
    plain = tiny_engine.fork(mode="kvshare")
    assert plain.chat(team("a"), max_new_tokens=2).stats.stages is None
    eng = tiny_engine.fork(mode="kvshare", profile=True)
    eng.chat(team("planner"), agent="p", max_new_tokens=2)
    s = eng.chat(team("critic"), agent="c", max_new_tokens=3, shadow=True).stats
    assert s.stages is not None and set(BEFORE_FIRST_TOKEN) <= set(s.stages)
    assert s.relocated_tokens > 0 and s.stages["estimate"] > 0 and s.stages["shadow"] > 0
    before_ttft = sum(s.stages[k] for k in BEFORE_FIRST_TOKEN)
    assert 0.5 * s.ttft_s < before_ttft <= s.ttft_s * 1.05 + 1e-3


def test_overhead_bench_separates_layers_from_the_rest(tiny_engine):
    rows = measure(tiny_engine, lengths=(48,), modes=("full", "kvshare"), items=1, agents=3)
    assert [(r.mode, r.input_len) for r in rows] == [("full", 48), ("kvshare", 48)]
    for r in rows:
        assert 0 < r.layers_ms < r.ttft_ms and r.overhead_ms == pytest.approx(
            r.ttft_ms - r.layers_ms, abs=0.5 * r.ttft_ms
        )
    assert rows[0].bare_forward_ms is not None and rows[1].bare_forward_ms is None
    # full: the sampled token and the logits' finiteness, read together
    assert rows[0].host_reads == 1
    # kvshare on the CPU: that read, faiss's search on the host, one compaction (free there)
    assert rows[1].host_reads is not None and 1 <= rows[1].host_reads <= 6


def test_host_read_counter_sees_syncs_and_restores_torch():
    from kvshare.bench.host_reads import count_host_reads

    getitem, item = torch.Tensor.__getitem__, torch.Tensor.item
    setitem, tensor = torch.Tensor.__setitem__, torch.tensor
    x = torch.arange(6.0)
    with count_host_reads() as counts:
        x.item() if x.numel() == 1 else x[0].item()
        x[x > 2]  # bool-mask index: a sync
        x[1:3]  # a view: none
        bool(x.sum() > 0)
        torch.unique(x)
        x[torch.tensor(2)]  # a 0-dim tensor index: torch reads its value
        x[torch.tensor([1, 2])]  # a gather: none
        y = x.clone()
        y[torch.tensor(0)] = 1.0  # written through a 0-dim index
        y[y > 4] = 0.0  # written through a mask
        y[torch.tensor([0, 1])] = 0.0  # a scatter: none
        torch.tensor([1, 2, 3], device=x.device)  # host data for a device: a blocking copy
        torch.as_tensor([1, 2], device=x.device)
        torch.tensor([1, 2, 3])  # host data staying on the host: none
        torch.as_tensor(x, device=x.device)  # already a tensor: none
        host = torch.from_numpy(np.arange(3))
        host.to(x.device)  # a host array sent over by a blocking copy
        host.to(device=x.device)
        host.to(x.device, non_blocking=True)  # from pinned memory on CUDA: none
        host.to(torch.float32)  # a dtype, no device: none
        x.to(x.device)  # not a host array: none
    assert sum(counts.values()) == 4 + 5 + 2
    assert torch.Tensor.__getitem__ is getitem and torch.Tensor.item is item
    assert torch.Tensor.__setitem__ is setitem and torch.tensor is tensor


def test_bench_profile_and_overhead_cli(tiny_dirs, tmp_path, capsys):
    model = str(tiny_dirs["llama"])
    args = ["bench", "--model", model, "--modes", "kvshare", "--agents", "2", "--prefix", "16"]
    args += ["--input", "32", "--output", "2", "--repeats", "1", "--profile"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    prof = json.loads((tmp_path / "synthetic-profile.json").read_text())
    assert set(prof) == {"full", "kvshare"} and prof["kvshare"][1]["prefill"] > 0
    assert (tmp_path / "synthetic-profile.png").stat().st_size > 1000
    assert "Stage profile" in capsys.readouterr().out
    over = ["bench", "--workload", "overhead", "--model", model, "--lengths", "32"]
    assert main([*over, "--agents", "2", "--items", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "overhead.json").read_text())
    assert {r["mode"] for r in rows} >= {"full", "kvshare"}
    assert torch.isfinite(torch.tensor([r["overhead_ms"] for r in rows])).all()


def test_a_random_weight_bench_reports_no_fidelity(tokenizer):
    from kvshare.bench.corpus import long_text
    from kvshare.bench.harness import run_bench
    from kvshare.bench.report import markdown
    from kvshare.bench.workloads import SyntheticWorkload

    eng = Engine.from_pretrained("random:tiny-deep")
    w = SyntheticWorkload(
        tokenizer, long_text(), n_agents=2, prefix_len=16, input_len=32, output_len=2
    )
    rep = run_bench(eng, w, ["kvshare"], repeats=1, progress=False)
    assert rep.random_weights and all(m.mean_kl is None for m in rep.modes)
    assert "n/a (random weights)" in markdown(rep)


def test_every_mode_is_a_registered_policy():
    from kvshare.config import MODES
    from kvshare.engine.policy import POLICIES

    assert POLICIES.names == MODES
    flags = {m: POLICIES.create(m) for m in MODES}
    assert not flags["full"].keeps_kv and flags["prefix"].keeps_kv
    assert [m for m in MODES if flags[m].relocates] == ["blend", "anchor", "kvshare"]
    assert [m for m in MODES if flags[m].anchored] == ["anchor", "kvshare"]
    with pytest.raises(ConfigError, match="choose one of full, prefix"):
        POLICIES.create("turbo")
