"""What torch.compile sees of the hot path (dynamo explain, CPU): the decode step today."""

from __future__ import annotations

import torch
from kvshare.kernels import KV, GrowingCache, cache_kwargs

from conftest import tiny_model


def test_the_decode_step_traces_without_graph_breaks():
    """One decode step (the model over one token with kvshare's preallocated cache) is one
    graph with no break: the step a compiled decode would run."""
    model = tiny_model("llama", num_hidden_layers=4)
    s = 24
    prompt = KV(torch.randn(4, 2, s, 16), torch.randn(4, 2, s, 16))
    cache = GrowingCache(prompt, s + 4)
    kwargs = cache_kwargs(model, cache)

    def step(ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=True, **kwargs)
        return out.logits

    args = (torch.tensor([[5]]), torch.tensor([[s]]), torch.zeros(1, 1, 1, s + 1))
    with torch.inference_mode():
        eager = step(*args)
        explained = torch._dynamo.explain(step)(*args)
    torch._dynamo.reset()
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    assert eager.shape == (1, 1, model.config.vocab_size)
