"""A call's writes to a shared tier (``kvshare.store.write_later``) run after its turn on the
model, so other calls are not held for them, and before it returns, so another replica can
read them as soon as the caller has its result: sync and async, trace and exact writes."""

from __future__ import annotations

import asyncio
import threading

import pytest

from kvshare import Engine, EngineConfig
from kvshare.store import write_later

from factories import team


def _engine(tiny_dirs, mode: str, space: str) -> Engine:
    radix = {} if mode == "prefix" else {"prefix_cache_bytes": 0}
    config = EngineConfig.of(mode=mode, shared_tier=f"memory://{space}", **radix)
    return Engine.from_pretrained(str(tiny_dirs["llama"]), config=config)


def _watch(engine: Engine, tier) -> list[tuple[bool, str]]:
    """Record, for each write to ``tier``, whether the model's turn was held and on which
    thread it ran."""
    seen: list[tuple[bool, str]] = []
    put = tier.put

    def watched(segment):
        seen.append((engine._turns._held, threading.current_thread().name))
        return put(segment)

    tier.put = watched
    return seen


@pytest.mark.parametrize("mode", ["kvshare", "prefix"])
def test_shared_writes_run_after_the_turn_and_before_chat_returns(tiny_dirs, mode):
    space = f"writes-{mode}"
    a, b = _engine(tiny_dirs, mode, space), _engine(tiny_dirs, mode, space)
    tier = a.parts.exact_shared if mode == "prefix" else a.segments.shared
    seen = _watch(a, tier)
    a.chat(team("planner"), agent="planner", tenant="acme", session="s", max_new_tokens=3)
    assert seen and all(not held for held, _ in seen)  # the model was free meanwhile
    assert {name for _, name in seen} == {threading.current_thread().name}  # the caller's
    role = "planner" if mode == "prefix" else "critic"  # prefix mode: the same prompt
    res = b.chat(team(role), agent=role, tenant="acme", session="s", max_new_tokens=3)
    assert res.stats.prefix_hit_tokens + res.stats.relocated_tokens > 0  # already readable


def test_async_calls_write_on_the_one_shared_writer_thread(tiny_dirs):
    a, b = (
        _engine(tiny_dirs, "kvshare", "writes-async"),
        _engine(tiny_dirs, "kvshare", "writes-async"),
    )
    seen = _watch(a, a.segments.shared)

    async def run():
        return await a.achat(team("planner"), agent="planner", tenant="acme", max_new_tokens=3)

    asyncio.run(run())
    assert seen and all(not held for held, _ in seen)
    assert {name for _, name in seen} == {"kvshare-shared-writes"}
    res = b.chat(team("critic"), agent="critic", tenant="acme", max_new_tokens=3)
    assert res.stats.relocated_tokens > 0


def test_collected_writes_wait_for_the_caller_and_nest():
    ran: list[str] = []
    with write_later.collected() as outer:
        write_later.write(lambda: ran.append("a"))
        with write_later.collected() as inner:
            write_later.write(lambda: ran.append("b"))
        assert ran == [] and len(inner) == 1
    assert ran == [] and len(outer) == 1
    write_later.run_all([*outer, *inner])
    write_later.write(lambda: ran.append("c"))  # not collecting: at once
    assert ran == ["a", "b", "c"]
