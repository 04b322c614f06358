"""Shared-prefix attention (``kvshare.model.shared_prefix``): rows holding one prefix once
attend exactly as each row over its own full copy (fp32, several prefix lengths, part
counts and batch sizes), the decode step over such rows matches transformers per sequence,
and the prefix is held once and let go with its last row."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F
from kvshare.kernels import KV
from model.test_batched import _alone, _prompt_kv

from kvshare.model.batched import BatchedDecoder, DecodeSlots
from kvshare.model.shared_prefix import SharedPrefix, attend_rows

from conftest import FAMILIES, tiny_model

H, R, D = 2, 3, 16  # kv heads, query heads per kv head, head dim


def _kv(g: torch.Generator, n: int, layers: int = 1) -> KV:
    return KV(torch.randn(layers, H, n, D, generator=g), torch.randn(layers, H, n, D, generator=g))


def _split(kv: KV, cuts: list[int]) -> tuple[KV, ...]:
    edges = [0, *cuts, kv.length]
    return tuple(KV(kv.keys[:, :, a:b], kv.values[:, :, a:b]) for a, b in pairwise(edges))


@pytest.mark.parametrize("prefix_len", [1, 7, 128, 300])
@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("parts", [1, 3])
@pytest.mark.parametrize("every", [1, 2])
def test_shared_prefix_attention_equals_each_row_over_its_own_copy(prefix_len, batch, parts, every):
    """Every row (every=1: one softmax over prefix and suffix) or every other row (every=2:
    merged by log-sum-exp; the rest have no prefix) shares the prefix; suffixes of different
    lengths (masked padding). Reference: SDPA over [prefix; suffix] per row."""
    g = torch.Generator().manual_seed(prefix_len * 31 + batch * 7 + parts + every)
    prefix = _kv(g, prefix_len)
    cuts = sorted({max(1, prefix_len * i // parts) for i in range(1, parts)} - {prefix_len})
    shared = SharedPrefix(_split(prefix, cuts))
    lengths = [1 + (5 * r) % 11 for r in range(batch)]
    span = max(lengths)
    suffix = _kv(g, span * batch)
    keys = suffix.keys[0].view(H, batch, span, D).transpose(0, 1)  # [B, H, S, D]
    values = suffix.values[0].view(H, batch, span, D).transpose(0, 1)
    at = torch.tensor(lengths)
    mask = (torch.arange(span)[None, :] < at[:, None])[:, None, None]
    q = torch.randn(batch, H * R, 1, D, generator=g)
    rows = [r for r in range(batch) if r % every == 0]
    got = attend_rows(q, keys, values, 0.125, mask, [(shared, torch.tensor(rows))], 0)
    for r in range(batch):
        own_k, own_v = keys[r, :, : lengths[r]], values[r, :, : lengths[r]]
        if r in rows:
            own_k = torch.cat([prefix.keys[0], own_k], 1)
            own_v = torch.cat([prefix.values[0], own_v], 1)
        want = F.scaled_dot_product_attention(
            q[r : r + 1], own_k[None], own_v[None], scale=0.125, enable_gqa=True
        )
        torch.testing.assert_close(got[r : r + 1], want, atol=1e-5, rtol=1e-5)


def test_two_prefixes_in_one_batch_each_reach_only_their_rows():
    g = torch.Generator().manual_seed(5)
    a, b = SharedPrefix((_kv(g, 40),)), SharedPrefix((_kv(g, 9),))
    keys, values = _kv(g, 4 * 3).keys[0].view(4, H, 3, D), _kv(g, 12).values[0].view(4, H, 3, D)
    q = torch.randn(4, H * R, 1, D, generator=g)
    groups = [(a, torch.tensor([0, 3])), (b, torch.tensor([1]))]
    got = attend_rows(q, keys, values, 0.25, None, groups, 0)
    for r, prefix in enumerate([a, b, None, a]):
        k, v = keys[r], values[r]
        if prefix is not None:
            k = torch.cat([prefix.parts[0].keys[0], k], 1)
            v = torch.cat([prefix.parts[0].values[0], v], 1)
        want = F.scaled_dot_product_attention(q[r : r + 1], k[None], v[None], scale=0.25,
                                              enable_gqa=True)  # fmt: skip
        torch.testing.assert_close(got[r : r + 1], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_over_one_held_prefix_step_as_each_sequence_alone(family):
    """Four sequences share a 37-token prompt head (held once, in two parts), then differ;
    a fifth shares nothing. Each step's logits and KV equal transformers' alone."""
    model = tiny_model(family)
    g = torch.Generator().manual_seed(1)
    head = torch.randint(3, 4000, (37,), generator=g)
    ids = [torch.cat([head, torch.randint(3, 4000, (n,), generator=g)]) for n in (1, 6, 3, 9)]
    ids.append(torch.randint(3, 4000, (12,), generator=g))
    prompts = [_prompt_kv(model, x) for x in ids]
    parts = _split(KV(prompts[0].keys[:, :, :37], prompts[0].values[:, :, :37]), [20])
    slots = DecodeSlots((2, 2, 16), torch.float32, torch.device("cpu"))
    for i, kv in enumerate(prompts):
        slots.admit(kv, kv.length + 3, ("head", parts) if i < 4 else None)
    assert len(slots.held) == 1 and slots.lengths[:4] == [1, 6, 3, 9]
    tokens = [11, 22, 33, 44, 55]
    step = BatchedDecoder(model)
    for _ in range(3):
        want = [_alone(model, slots.kv(r), t) for r, t in enumerate(tokens)]
        got = step.step(slots, torch.tensor(tokens), torch.tensor(slots.positions()))
        for r, (logits, kv) in enumerate(want):
            torch.testing.assert_close(got[r], logits, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(slots.kv(r).keys, kv.keys, atol=1e-5, rtol=1e-5)
        tokens = got.argmax(-1).tolist()


def test_a_held_prefix_is_let_go_with_its_last_row():
    g = torch.Generator().manual_seed(2)
    prompts = [_kv(g, 10) for _ in range(3)]
    head = (KV(prompts[0].keys[:, :, :6], prompts[0].values[:, :, :6]),)
    slots = DecodeSlots((1, H, D), torch.float32, torch.device("cpu"))
    slots.admit(prompts[0], 12, ("k", head))
    slots.admit(prompts[1], 12)
    slots.admit(prompts[0], 12, ("k", head))
    assert slots.held["k"].refs == 2 and slots.held_bytes == 2 * 6 * H * D * 4
    assert slots.positions() == [10, 10, 10] and slots.lengths == [4, 10, 4]
    assert slots.release(0) == 2 and slots.offset(0) == 6 and slots.held["k"].refs == 1
    assert torch.equal(slots.kv(0).keys, prompts[0].keys)  # prefix + own tokens, in order
    slots.release(0)
    assert slots.held == {} and slots.offset(0) == 0
