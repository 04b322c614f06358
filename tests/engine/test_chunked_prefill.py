"""Chunked prefill in the step loop (``EngineConfig.prefill_chunk_tokens``,
``kvshare.engine.prefills``): an ordinary causal prefill runs a chunk a step beside the
decodes; calls get the tokens of whole prefills, alone and together, sync and async."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from test_batcher import ROLES, _call, _together

from factories import team

CHUNK = 16  # tokens a step: these prompts (~60-90 tokens) take several chunks


@pytest.mark.parametrize("mode", ["full", "prefix"])
def test_chunked_calls_get_the_tokens_of_whole_prefills(tiny_engine, mode):
    whole = tiny_engine.fork(mode=mode)
    chunked = tiny_engine.fork(mode=mode, prefill_chunk_tokens=CHUNK)
    for i in range(4):
        want, got = _call(whole, i), _call(chunked, i)
        assert got.tokens == want.tokens
        assert got.stats.prefix_hit_tokens == want.stats.prefix_hit_tokens
    assert chunked.batcher is not None and chunked.batcher.prefills.chunks >= 4 * 3
    assert whole.batcher is not None and whole.batcher.prefills.chunks == 0
    assert chunked.memory() == whole.memory()  # the same KV kept, byte for byte in size


@pytest.mark.parametrize("mode", ["full", "prefix"])
def test_eight_threads_with_chunked_prefills_get_their_alone_tokens(tiny_engine, mode):
    alone = tiny_engine.fork(mode=mode, prefill_chunk_tokens=CHUNK)
    want = [_call(alone, i) for i in range(8)]
    eng = tiny_engine.fork(mode=mode, prefill_chunk_tokens=CHUNK)
    got = _together(eng)
    assert [r.tokens for r in got] == [r.tokens for r in want]
    assert eng.batcher is not None and eng.batcher.prefills.beside > 0  # chunks beside decodes
    assert eng.memory() == alone.memory()


def test_a_decoding_call_advances_while_a_long_prompt_prefills(tiny_engine):
    """A decodes; B's prompt (~600 tokens, 38 chunks of 16) is prefilled a chunk a step
    beside A: A's tokens keep coming before B's first token."""
    eng = tiny_engine.fork(mode="full", prefill_chunk_tokens=CHUNK)
    long_doc = [{"role": "user", "content": "word " * 600}]
    decoding, events = threading.Event(), []

    def a() -> None:
        def seen(_: int) -> None:
            events.append("a")
            decoding.set()

        eng.chat(team(ROLES[0]), max_new_tokens=60, on_token=seen)

    thread = threading.Thread(target=a)
    thread.start()
    assert decoding.wait(10)
    eng.chat(long_doc, max_new_tokens=1, on_token=lambda _: events.append("b"))
    thread.join()
    b_first = events.index("b")
    assert events[:b_first].count("a") >= 10  # A went on while B prefilled
    assert eng.batcher is not None and eng.batcher.prefills.beside >= 10


def test_relocating_calls_prefill_whole_and_stay_within_the_fidelity_bar(tiny_engine):
    eng = tiny_engine.fork(mode="kvshare", prefill_chunk_tokens=CHUNK)
    _together(eng, shadow=True)  # nothing stored yet: ordinary prefills, chunked
    assert eng.batcher is not None
    first_wave = eng.batcher.prefills.chunks
    assert first_wave > 0
    got = _together(eng, shadow=True)
    assert sum(r.stats.relocated_tokens + r.stats.prefix_hit_tokens for r in got) > 0
    assert all(r.stats.kl is not None and r.stats.kl <= 0.005 for r in got)


def test_achat_with_chunked_prefills_equals_chat(tiny_engine):
    sync = tiny_engine.fork(mode="prefix", prefill_chunk_tokens=CHUNK)
    want = [_call(sync, i).tokens for i in range(4)]
    eng = tiny_engine.fork(mode="prefix", prefill_chunk_tokens=CHUNK)

    async def run() -> list[list[int]]:
        calls = [eng.achat(team(ROLES[i]), agent=ROLES[i], session=f"s{i}", tenant=f"t{i % 3}",
                           max_new_tokens=6 + i % 5) for i in range(4)]  # fmt: skip
        return [r.tokens for r in await asyncio.gather(*calls)]

    assert asyncio.run(run()) == want


def test_a_cancelled_async_call_leaves_its_chunks_and_nothing_behind(tiny_engine):
    eng = tiny_engine.fork(mode="prefix", prefill_chunk_tokens=4)
    long_doc = [{"role": "user", "content": "word " * 300}]

    async def run() -> None:
        task = asyncio.ensure_future(eng.achat(long_doc, max_new_tokens=4))
        while eng.batcher is None or eng.batcher.prefills.chunks < 3:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert eng.batcher is not None
    for _ in range(200):  # the step loop drops the cancelled job at its next step
        if not eng.batcher.prefills:
            break
        time.sleep(0.01)
    assert not eng.batcher.prefills
    assert len(eng.calls) == 0 and eng.memory().total == 0
    assert _call(eng, 0).tokens == _call(tiny_engine.fork(mode="prefix"), 0).tokens


def test_prefill_chunk_tokens_is_checked():
    from kvshare.config import EngineConfig
    from kvshare.errors import ConfigError

    with pytest.raises(ConfigError, match="prefill_chunk_tokens"):
        EngineConfig(prefill_chunk_tokens=-1)
    assert EngineConfig().prefill_chunk_tokens == 0  # whole prefills unless asked
