"""The batched decode step (``kvshare.model.batched``) against the model's own forward:
each sequence of a batch with caches of different lengths gets the logits and KV it gets
alone through transformers."""

from __future__ import annotations

import pytest
import torch
from kvshare.kernels import KV, GrowingCache, cache_kwargs
from kvshare.kernels.kv import output_cache

from kvshare.model.batched import BatchedDecoder, DecodeSlots, batchable

from conftest import DEVICES, FAMILIES, tiny_config, tiny_model


def _prompt_kv(model, ids: torch.Tensor) -> KV:
    with torch.inference_mode():
        out = model(input_ids=ids[None], use_cache=True)
    return KV.from_cache(output_cache(out), 0)


def _alone(model, kv: KV, token: int) -> tuple[torch.Tensor, KV]:
    """One step through transformers over ``kv``: (logits [V], KV after it)."""
    cache = GrowingCache(kv, kv.length + 1)
    with torch.inference_mode():
        out = model(
            input_ids=torch.tensor([[token]], device=kv.keys.device),
            position_ids=torch.tensor([[kv.length]], device=kv.keys.device),
            attention_mask=None,
            use_cache=True,
            **cache_kwargs(model, cache),
        )
    cache.advance(1)
    return out.logits[0, -1].float(), cache.kv()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("device", DEVICES)
def test_a_batch_of_ragged_caches_steps_as_each_sequence_alone(family, device):
    model = tiny_model(family).to(device)
    assert batchable(model)
    g = torch.Generator().manual_seed(0)
    prompts = [_prompt_kv(model, torch.randint(3, 4000, (n,), generator=g).to(device))
               for n in (5, 17, 9, 17)]  # fmt: skip
    tokens = [11, 22, 33, 44]
    slots = DecodeSlots((2, 2, 16), torch.float32, torch.device(device))
    for kv in prompts:
        slots.admit(kv, kv.length + 3)
    step = BatchedDecoder(model)
    for _ in range(3):
        want = [_alone(model, slots.kv(r), t) for r, t in enumerate(tokens)]
        pos = torch.tensor(slots.lengths, device=device)
        got = step.step(slots, torch.tensor(tokens, device=device), pos)
        for r, (logits, kv) in enumerate(want):
            torch.testing.assert_close(got[r], logits, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(slots.kv(r).keys, kv.keys, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(slots.kv(r).values, kv.values, atol=1e-5, rtol=1e-5)
        tokens = got.argmax(-1).tolist()


def test_one_sequence_steps_exactly_as_transformers():
    """Batch of one, no padding: bit-identical logits to the model's own decode step."""
    model = tiny_model("llama")
    kv = _prompt_kv(model, torch.arange(3, 40))
    slots = DecodeSlots((2, 2, 16), torch.float32, torch.device("cpu"))
    slots.admit(kv, kv.length + 1)
    got = BatchedDecoder(model).step(slots, torch.tensor([7]), torch.tensor([kv.length]))
    want, after = _alone(model, kv, 7)
    assert torch.equal(got[0], want) and torch.equal(slots.kv(0).keys, after.keys)


def test_padding_is_finite_so_a_ragged_batch_never_turns_nan():
    """Masked-out padding still multiplies its values by a zero weight: garbage NaN there
    would poison the row. Under deterministic mode torch fills uninitialised memory with NaN,
    so an uninitialised slot buffer fails this test."""
    model = tiny_model("llama")
    torch.use_deterministic_algorithms(True)
    try:
        slots = DecodeSlots((2, 2, 16), torch.float32, torch.device("cpu"))
        for n in (3, 30):
            slots.admit(_prompt_kv(model, torch.arange(5, 5 + n)), n + 2)
        logits = BatchedDecoder(model).step(slots, torch.tensor([7, 8]), torch.tensor([3, 30]))
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.isfinite(logits).all()


def test_slots_release_moves_the_last_row_and_grow_keeps_contents():
    slots = DecodeSlots((1, 1, 2), torch.float32, torch.device("cpu"))
    kvs = [KV(torch.full((1, 1, n, 2), float(n)), torch.full((1, 1, n, 2), -float(n)))
           for n in (2, 3, 4)]  # fmt: skip
    for kv in kvs:
        slots.admit(kv, kv.length)
    assert slots.rows == 3 and slots.keys.shape[3] >= 4
    assert slots.release(0) == 2 and slots.lengths == [4, 3]
    assert torch.equal(slots.kv(0).keys, kvs[2].keys)
    assert torch.equal(slots.kv(1).values, kvs[1].values)
    assert slots.release(1) is None and slots.rows == 1


def test_a_sliding_window_layout_is_not_batched():
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("mistral")
    cfg.sliding_window = 8
    model = AutoModelForCausalLM.from_config(cfg)
    assert not batchable(model)
    with pytest.raises(ValueError, match="mistral"):
        BatchedDecoder(model)
