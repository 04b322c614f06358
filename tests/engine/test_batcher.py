"""Continuous batching of decodes (``kvshare.engine.batcher``): calls from many threads
decode together and each gets what it gets alone."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from kvshare import Engine

from factories import team

ROLES = ("planner", "critic", "judge", "writer", "checker", "coder", "tester", "editor")


def _call(engine: Engine, i: int, **kw):
    """Call i: its own role and tenant, a reply of 6 + i % 5 tokens."""
    return engine.chat(team(ROLES[i]), agent=ROLES[i], session=f"s{i}", tenant=f"t{i % 3}",
                       max_new_tokens=6 + i % 5, **kw)  # fmt: skip


def _together(engine: Engine, n: int = 8, **kw) -> list:
    start = threading.Barrier(n)

    def run(i: int):
        start.wait()
        return _call(engine, i, **kw)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(run, range(n)))


@pytest.mark.parametrize("mode", ["full", "prefix"])
def test_eight_threads_get_the_tokens_they_get_alone(tiny_engine, mode):
    alone = tiny_engine.fork(mode=mode)
    want = [_call(alone, i) for i in range(8)]
    together = tiny_engine.fork(mode=mode)
    got = _together(together)
    assert [r.tokens for r in got] == [r.tokens for r in want]
    assert [r.stats.finish_reason for r in got] == [r.stats.finish_reason for r in want]
    assert together.batcher is not None and together.batcher.stats()["mean_batch"] > 1.5
    assert together.memory() == alone.memory()  # the same KV was kept


def test_eight_kvshare_threads_over_three_tenants_stay_within_the_fidelity_bar(tiny_engine):
    """Which call reuses whose KV depends on arrival order, so a reused call is held to the
    fidelity bar against its own full prefill (shadow KL <= 0.005), not to a serial run."""
    eng = tiny_engine.fork(mode="kvshare")
    _together(eng, shadow=True)  # the first wave stores the document per tenant
    got = _together(eng, shadow=True)
    assert sum(r.stats.relocated_tokens + r.stats.prefix_hit_tokens for r in got) > 0
    assert all(r.stats.kl is not None and r.stats.kl <= 0.005 for r in got)


def test_a_failing_on_token_cancels_only_its_own_call(tiny_engine):
    eng = tiny_engine.fork(mode="prefix")
    want = _call(tiny_engine.fork(mode="prefix"), 1).tokens

    def bad(token: int) -> None:
        raise RuntimeError("consumer gone")

    start = threading.Barrier(2)

    def run(i: int):
        start.wait()
        return _call(eng, i, on_token=bad if i == 0 else None)

    with ThreadPoolExecutor(2) as pool:
        failing, fine = pool.submit(run, 0), pool.submit(run, 1)
        with pytest.raises(RuntimeError, match="consumer gone"):
            failing.result()
        assert fine.result().tokens == want
    assert _call(eng, 2).tokens  # the batcher goes on


def test_streamed_tokens_come_in_order_on_the_calling_thread(tiny_engine):
    eng = tiny_engine.fork(mode="prefix")
    seen: list[tuple[int, str]] = []
    r = _call(eng, 3, on_token=lambda t: seen.append((t, threading.current_thread().name)))
    eos = set(eng.eos_ids)
    assert [t for t, _ in seen] == [t for t in r.tokens if t not in eos]
    assert {name for _, name in seen} == {threading.current_thread().name}


def test_batch_decode_off_decodes_alone_with_the_same_tokens(tiny_engine):
    on, off = tiny_engine.fork(mode="prefix"), tiny_engine.fork(mode="prefix", batch_decode=False)
    assert off.batcher is None and on.batcher is not None
    assert [_call(on, i).tokens for i in range(3)] == [_call(off, i).tokens for i in range(3)]


def test_achat_batches_without_a_thread_per_call_and_matches_chat(tiny_engine):
    import asyncio

    serial = tiny_engine.fork(mode="prefix")
    want = [_call(serial, i).tokens for i in range(8)]
    eng = tiny_engine.fork(mode="prefix")
    _call(eng, 0)  # the worker thread exists from here on
    before = threading.active_count()
    seen: list[str] = []

    async def main():
        def note(token: int) -> None:
            seen.append(threading.current_thread().name)

        async def one(i: int):
            return await eng.achat(team(ROLES[i]), agent=ROLES[i], session=f"s{i}",
                                   tenant=f"t{i % 3}", max_new_tokens=6 + i % 5,
                                   on_token=note)  # fmt: skip

        out = await asyncio.gather(*(one(i) for i in range(8)))
        return out, threading.active_count()

    got, during = asyncio.run(main())
    assert [r.tokens for r in got[1:]] == want[1:]  # call 0 reused its own earlier call
    assert during == before and set(seen) == {threading.main_thread().name}
    assert eng.batcher.stats()["mean_batch"] > 1.5


def test_achat_checks_its_arguments_first_and_falls_back_without_a_batcher(tiny_engine):
    import asyncio

    from kvshare.errors import ConfigError

    eng = tiny_engine.fork(mode="prefix")
    with pytest.raises(ConfigError, match="unknown chat option"):
        asyncio.run(eng.achat(team("critic"), colour="red"))
    with pytest.raises(ConfigError, match="max_new_tokens"):
        asyncio.run(eng.achat(team("critic"), max_new_tokens=0))
    assert len(eng.calls) == 0
    off = tiny_engine.fork(mode="prefix", batch_decode=False)
    r = asyncio.run(off.achat(team("critic"), max_new_tokens=5))
    assert r.tokens == tiny_engine.fork(mode="prefix").chat(team("critic"), max_new_tokens=5).tokens


def test_at_most_max_decode_batch_calls_decode_at_once(tiny_engine):
    eng = tiny_engine.fork(mode="prefix", max_decode_batch=2)
    got = _together(eng)
    assert [r.tokens for r in got] == [_call(tiny_engine.fork(mode="prefix"), i).tokens
                                       for i in range(8)]  # fmt: skip
    stats = eng.batcher.stats()
    assert 1.0 < stats["mean_batch"] <= 2.0


def test_seeded_sampling_and_greedy_mixed_in_one_batch_match_alone(tiny_engine):
    """Half the calls sample (their own seed and generator), half are greedy: each gets the
    tokens it gets alone."""
    kw = lambda i: {"temperature": 0.8, "seed": i} if i % 2 else {}  # noqa: E731
    alone = tiny_engine.fork(mode="full")
    want = [_call(alone, i, **kw(i)).tokens for i in range(6)]
    eng = tiny_engine.fork(mode="full")
    start = threading.Barrier(6)

    def run(i: int):
        start.wait()
        return _call(eng, i, **kw(i)).tokens

    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(run, range(6))) == want
    assert eng.batcher.stats()["mean_batch"] > 1.5
