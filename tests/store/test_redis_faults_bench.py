"""``kvshare bench --workload redis-faults`` at a small size (tiny model, 8 rounds): faults of
every kind and a restart are injected, no call fails, no wrong KV is served, and B reuses
A's KV in the clean rounds."""

from __future__ import annotations

from kvshare.bench.redis_faults import FAULTS, markdown, measure


def test_small_fault_run_serves_no_wrong_kv_and_fails_no_call(tiny_engine):
    rep = measure(
        tiny_engine, rounds=8, clean=2, restart_every=3, agents=3, prefix_len=16,
        input_len=96, output_len=3,
    )  # fmt: skip
    assert rep.calls == 8 * 3 + 2 and rep.failed_calls == 0 and rep.wrong_kv_served == 0
    assert rep.injected >= 15 and rep.faults["restart"] == 2
    assert set(FAULTS) <= set(rep.faults)
    assert rep.tier["corrupt"] >= 1 and rep.tier["failures"] >= 1  # restarts cost a call
    assert min(rep.clean_reuse) > 0 and len(rep.faulty_reuse) == 6
    assert "| wrong KV served | 0 |" in markdown(rep)
