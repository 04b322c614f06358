"""Calls decoding over one reused prefix (``EngineConfig.share_prefix_tokens``): the prefix is
held once for every row that starts with it, each call decodes the tokens it decodes with
its own copy, and no second copy of a call's prompt stays alive while it decodes."""

from __future__ import annotations

import gc
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from kvshare.kernels import splice

from kvshare import Engine
from kvshare.engine import call

from factories import DOC

QUESTIONS = ("Who kept the ledger?", "What was counted?", "When?", "Name one ship.")


def _asked(q: str) -> list[dict]:
    return [
        {"role": "system", "content": "You answer from the document."},
        {"role": "user", "content": DOC * 2},
        {"role": "assistant", "content": "I have read it."},
        {"role": "user", "content": q},
    ]


def _warm(engine: Engine) -> None:
    """Store the document's prompt (the radix prefix every question then reuses)."""
    engine.chat(_asked("Summarise.")[:2], session="s", max_new_tokens=2)


def _four_at_once(engine: Engine, on_token=None) -> list:
    start = threading.Barrier(len(QUESTIONS))

    def run(q: str):
        start.wait()
        return engine.chat(_asked(q), session="s", max_new_tokens=8, on_token=on_token)

    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        return list(pool.map(run, QUESTIONS))


@pytest.mark.parametrize("mode", ["prefix", "kvshare"])
def test_four_calls_over_one_prefix_hold_it_once_and_decode_as_with_copies(tiny_engine, mode):
    copies = tiny_engine.fork(mode=mode, share_prefix_tokens=0)
    _warm(copies)
    want = [copies.chat(_asked(q), session="s", max_new_tokens=8) for q in QUESTIONS]
    shared = tiny_engine.fork(mode=mode, share_prefix_tokens=16)
    _warm(shared)
    seen: list[tuple[int, int]] = []  # (prefixes held, rows over them) during decodes

    def look(_token: int) -> None:
        slots = shared.batcher.slots if shared.batcher is not None else None
        if slots is not None:
            held = list(slots.held.values())
            seen.append((len(held), sum(p.refs for p in held)))

    got = _four_at_once(shared, look)
    assert all(r.stats.prefix_hit_tokens >= 16 for r in got)
    assert [r.tokens for r in got] == [r.tokens for r in want]
    assert max(refs for _, refs in seen) >= 2  # rows decoded over one held prefix at once
    assert all(held <= 1 for held, _ in seen)  # ... held once, not once per row
    assert shared.memory() == copies.memory()  # the same KV (prefix + own tokens) was kept


@pytest.mark.parametrize("mode", ["prefix", "kvshare"])
def test_a_reused_prefix_is_the_first_part_of_the_calls_own_kv(tiny_engine, mode):
    """What sharing promises the batcher: the prefill leaves the reused slots untouched."""
    eng = tiny_engine.fork(mode=mode, share_prefix_tokens=16)
    _warm(eng)
    req = eng._request(_asked(QUESTIONS[0]), None, {"session": "s", "max_new_tokens": 4})
    with eng._turn():
        b = call.begin(eng, req)
    assert b.shared is not None
    parts = b.shared[1]
    n = sum(p.length for p in parts)
    assert n >= 16
    head = splice(list(parts))
    assert torch.equal(b.pre.kv.keys[:, :, :n], head.keys)
    assert torch.equal(b.pre.kv.values[:, :, :n], head.values)


def test_while_a_call_decodes_its_prompt_kv_lives_only_in_its_row(tiny_engine):
    eng = tiny_engine.fork(mode="prefix", share_prefix_tokens=16)
    _warm(eng)
    req = eng._request(_asked(QUESTIONS[1]), None, {"session": "s", "max_new_tokens": 6})
    with eng._turn():
        b = call.begin(eng, req)
    prompt = weakref.ref(b.pre.kv.keys)
    alive: list[bool] = []

    def look(_token: int) -> None:
        gc.collect()
        alive.append(prompt() is not None)

    dec = call.decode_batched(eng, req, b, look)
    assert len(alive) > 1 and not any(alive[1:])  # the first token is handed out on entry
    assert dec.kv.length == len(req.prompt) + len(dec.tokens) - 1
