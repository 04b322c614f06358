"""What torch.compile sees of the hot path (dynamo explain, CPU): the decode step, the masked
recompute forward and a gradual prefill whose kept counts are known on the host. Each is one
graph with no break: the units a compiled or CUDA-graph-captured engine would run. Beside
them, the GPU check: a fixed-shape ``kvshare`` call under ``set_sync_debug_mode("error")``."""

from __future__ import annotations

import pytest
import torch
from kvshare.kernels import KV, GrowingCache, cache_kwargs, gradual_prefill
from kvshare.kernels.prefill import _masked

from kvshare.engine.select import DeviationFilter
from kvshare.model.adapter import ModelAdapter

from conftest import tiny_model

S = 32


def _explain(fn, *args):
    with torch.inference_mode():
        explained = torch._dynamo.explain(fn)(*args)
    torch._dynamo.reset()
    return explained


def test_the_decode_step_traces_without_graph_breaks():
    """One decode step (the model over one token with kvshare's preallocated cache, no mask)
    is one graph with no break: the step a compiled decode would run."""
    model = tiny_model("llama", num_hidden_layers=4)
    prompt = KV(torch.randn(4, 2, S, 16), torch.randn(4, 2, S, 16))
    cache = GrowingCache(prompt, S + 4)
    kwargs = cache_kwargs(model, cache)

    def step(ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=ids, position_ids=pos, attention_mask=None, use_cache=True, **kwargs)
        return out.logits

    args = (torch.tensor([[5]]), torch.tensor([[S]]))
    with torch.inference_mode():
        eager = step(*args)
    explained = _explain(step, *args)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    assert eager.shape == (1, 1, model.config.vocab_size)


def test_the_masked_recompute_forward_traces_without_graph_breaks():
    """The recompute forward of a selection (exact mask by true positions, fresh KV written
    into its slots) is one graph with no break."""
    model = tiny_model("llama", num_hidden_layers=4)
    keys, values = torch.randn(4, 2, S, 16), torch.randn(4, 2, S, 16)
    ids, pos, sel = torch.randint(3, 500, (S,)), torch.arange(S), torch.arange(8, S, 2)

    def recompute(k: torch.Tensor, v: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
        return _masked(model, KV(k, v), ids, pos, sel, False).logits

    explained = _explain(recompute, keys, values, sel)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_a_gradual_prefill_with_host_known_counts_traces_without_graph_breaks():
    """Narrowed by the deviation filter, whose kept counts the host knows (``kept``), a
    gradual prefill over check layers (1, 2) reads nothing and is one graph with no break;
    with a deviation threshold the last check's set is carried on at full size."""
    model = tiny_model("llama", num_hidden_layers=4)
    keys, values = torch.randn(4, 2, S, 16), torch.randn(4, 2, S, 16)
    ids, pos, sel = torch.randint(3, 500, (S,)), torch.arange(S), torch.arange(4, S)
    forced = torch.zeros(S, dtype=torch.bool)
    forced[[4, 5, S - 1]] = True
    protect = torch.zeros(S, dtype=torch.bool)
    protect[[10, 11]] = True
    for threshold in (None, 0.5):
        narrow = DeviationFilter(forced, protect, 4, 8, 2, threshold, n_forced=3, n_protect=2)

        def prefill(k: torch.Tensor, v: torch.Tensor, f: DeviationFilter) -> torch.Tensor:
            parts, cache = ModelAdapter(model), KV(k, v)
            return gradual_prefill(parts, cache, ids, pos, sel, (1, 2), f, f.kept, True).logits

        explained = _explain(prefill, keys.clone(), values.clone(), narrow)
        assert explained.graph_break_count == 0 and explained.graph_count == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_fixed_shape_call_never_syncs_before_its_token_on_cuda(tiny_dirs, monkeypatch):
    """On CUDA, with syncs made errors, the estimate, choice and prefill of a ``kvshare``-mode
    call that reuses relocated runs complete: the only sync left is the sampled token's."""
    from kvshare import Engine, EngineConfig
    from kvshare.engine import pipeline

    from factories import team

    cfg = EngineConfig.of(mode="kvshare", fixed_shapes="on", anchor_index="torch")
    engine = Engine.from_pretrained(str(tiny_dirs["llama"]), device="cuda", config=cfg)
    engine.chat(team("planner"), agent="planner", max_new_tokens=2)
    engine.chat(team("critic"), agent="critic", max_new_tokens=2, teach=True)  # anchors
    engine.chat(team("planner"), agent="planner", max_new_tokens=2)
    ran: list[str] = []

    def strict(step):
        def run(*args, **kwargs):
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                return step(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                ran.append(step.__name__)

        return run

    for name in ("estimate", "choose", "prefill"):
        monkeypatch.setattr(pipeline, name, strict(getattr(pipeline, name)))
    r = engine.chat(team("critic"), agent="critic", max_new_tokens=2)
    assert ran == ["estimate", "choose", "prefill"] and r.stats.relocated_tokens > 0


@pytest.mark.parametrize("shared", ["none", "all rows", "some rows"])
def test_the_batched_decode_step_traces_without_graph_breaks(shared):
    """The batcher's step (``kvshare.model.batched``) over a ragged batch of three, without
    a shared prefix, with one under every row (one softmax) or under some (merged): one
    graph, no break (row lengths and groups are host values, specialised per step)."""
    from kvshare.model.batched import BatchedDecoder, DecodeSlots

    model = tiny_model("llama", num_hidden_layers=4)
    slots = DecodeSlots((4, 2, 16), torch.float32, torch.device("cpu"))
    head = KV(torch.randn(4, 2, 7, 16), torch.randn(4, 2, 7, 16))
    for i, n in enumerate((S, S - 5, S - 9)):
        kv = KV(torch.randn(4, 2, n, 16), torch.randn(4, 2, n, 16))
        under = shared == "all rows" or (shared == "some rows" and i != 1)
        if under:
            kv = KV(torch.cat([head.keys, kv.keys], 2), torch.cat([head.values, kv.values], 2))
        slots.admit(kv, kv.length + 4, ("head", (head,)) if under else None)
    step = BatchedDecoder(model).step
    tokens, positions = torch.tensor([5, 6, 7]), torch.tensor(slots.positions())
    explained = _explain(lambda t, p: step(slots, t, p), tokens, positions)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
