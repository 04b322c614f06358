"""Chunked prefill inside the decode step (``kvshare.model.chunked``): a prompt prefilled in
chunks gets transformers' KV and logits within float tolerance, and a chunk's result does
not depend on the decodes beside it beyond float rounding, nor theirs on it. (Not bit for bit:
a GEMM's row can round differently with the number of rows, e.g. below ~16 rows on this CPU's
BLAS; the decode batch already has that property.)"""

from __future__ import annotations

import pytest
import torch
from kvshare.kernels import KV
from kvshare.kernels.kv import output_cache

from kvshare.model.batched import BatchedDecoder, DecodeSlots
from kvshare.model.chunked import Chunk, bounds

from conftest import FAMILIES, tiny_model


def _whole(model, ids: torch.Tensor) -> tuple[KV, torch.Tensor]:
    with torch.inference_mode():
        out = model(input_ids=ids[None], use_cache=True)
    return KV.from_cache(output_cache(out), 0), out.logits[0, -1].float()


def _chunked(step, ids, first: int, budget: int, cache: KV, decodes=None):
    """Prefill ids[first:] over ``cache`` (valid over [0, first)) in chunks of ``budget``;
    ``decodes``: (slots, token) stepped beside every chunk. Returns the last logits and
    the decode logits of each step."""
    seen, logits = [], None
    for s, e in bounds(first, ids.numel(), budget):
        chunk = Chunk(cache, ids[s:e], s, e == ids.numel())
        slots, token = decodes if decodes is not None else (None, 0)
        b = slots.rows if slots is not None else 0
        tokens = torch.full((b,), token)
        pos = torch.tensor(slots.positions() if slots is not None else [], dtype=torch.long)
        dec, last = step.forward(slots, tokens, pos, chunk)
        seen.append(dec)
        logits = last if last is not None else logits
    return logits, seen


def _empty(kv: KV) -> KV:
    return KV(torch.zeros_like(kv.keys), torch.zeros_like(kv.values))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("first,budget", [(0, 7), (0, 64), (13, 5), (29, 16)])
def test_a_prompt_prefilled_in_chunks_matches_the_whole_prefill(family, first, budget):
    model = tiny_model(family)
    ids = torch.randint(3, 4000, (45,), generator=torch.Generator().manual_seed(1))
    want_kv, want_logits = _whole(model, ids)
    cache = _empty(want_kv)
    cache.keys[:, :, :first] = want_kv.keys[:, :, :first]  # an exact reused prefix
    cache.values[:, :, :first] = want_kv.values[:, :, :first]
    logits, _ = _chunked(BatchedDecoder(model), ids, first, budget, cache)
    torch.testing.assert_close(logits, want_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cache.keys, want_kv.keys, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.values, want_kv.values, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_a_chunk_and_the_decodes_beside_it_do_not_change_each_other(rows):
    """The chunk's KV and logits alone and beside ``rows`` decodes; the decodes' logits and
    KV beside the chunk and in a plain step (float tolerance, see the module docstring)."""
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 4000, (40,), generator=g)
    shape_kv, _ = _whole(model, ids)
    alone, together = _empty(shape_kv), _empty(shape_kv)
    step = BatchedDecoder(model)
    want_logits, _ = _chunked(step, ids, 0, 16, alone)
    prompts = [_whole(model, torch.randint(3, 4000, (n,), generator=g))[0]
               for n in range(5, 5 + rows)]  # fmt: skip
    beside, plain = (DecodeSlots((2, 2, 16), torch.float32, torch.device("cpu")) for _ in "ab")
    for kv in prompts:
        beside.admit(kv, kv.length + 4)
        plain.admit(kv, kv.length + 4)
    got_logits, dec = _chunked(step, ids, 0, 16, together, (beside, 9))
    close = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_logits, want_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(together.keys, alone.keys, **close)
    torch.testing.assert_close(together.values, alone.values, **close)
    for seen in dec:
        pos = torch.tensor(plain.positions())
        want = step.step(plain, torch.full((rows,), 9), pos)
        torch.testing.assert_close(seen, want, atol=1e-4, rtol=1e-4)
    for r in range(rows):
        torch.testing.assert_close(beside.kv(r).keys, plain.kv(r).keys, **close)
        torch.testing.assert_close(beside.kv(r).values, plain.kv(r).values, **close)


def test_chunk_bounds_are_fixed_by_the_call():
    assert bounds(0, 10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert bounds(7, 8, 256) == [(7, 8)]
    assert bounds(5, 5, 3) == []
    with pytest.raises(ValueError, match="budget"):
        bounds(0, 4, 0)
