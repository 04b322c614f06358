"""Shadows observe, teaching is asked for (``kvshare.engine.reference``): a run with
``shadow=True`` on every call computes exactly what the same run without shadows computes and
leaves the same learned state; only ``teach=True`` lets a full prefill teach."""

from __future__ import annotations

import pytest

from kvshare import Engine

from factories import fingerprint, team

DOCS = ("", " The committee also moved the vote to Friday.")
TIMINGS = {"ttft_s", "decode_tok_s", "stages", "kl", "top1_agree", "greedy_match"}


def _run(engine: Engine, **flags: bool) -> tuple[list, list]:
    """A workflow of four agents over two documents; (tokens, stats without timings and
    fidelity) of every call."""
    tokens, stats = [], []
    for extra in DOCS:
        for role in ("planner", "critic", "judge", "critic"):
            msgs = team(role)
            msgs[-1] = {**msgs[-1], "content": msgs[-1]["content"] + extra}
            r = engine.chat(msgs, agent=role, session="s", max_new_tokens=4, **flags)
            tokens.append(r.tokens)
            stats.append({k: v for k, v in r.stats.as_dict().items() if k not in TIMINGS})
    return tokens, stats


def _learned(engine: Engine) -> tuple:
    """Everything a call may change (stores, scopes, traces, every scope's pool contents,
    gains, hits and ratio), without the ledger's fidelity totals."""
    mem, scopes, segments, learned, _, calls = fingerprint(engine)
    return mem, scopes, segments, learned, calls


@pytest.mark.parametrize("mode", ["blend", "anchor", "kvshare"])
def test_shadows_observe_without_changing_anything(tiny_engine, mode):
    quiet, observed = tiny_engine.fork(mode=mode), tiny_engine.fork(mode=mode)
    plain_tokens, plain_stats = _run(quiet)
    shadow_tokens, shadow_stats = _run(observed, shadow=True)
    assert shadow_tokens == plain_tokens and shadow_stats == plain_stats
    assert _learned(observed) == _learned(quiet)
    assert observed.stats().mean_kl is not None and quiet.stats().mean_kl is None
    assert all(c.kl is not None for c in observed.calls if c.relocated_tokens)


def test_teaching_is_what_teaches(tiny_engine):
    """``teach=True`` (with or without a shadow) admits every relocated token's true
    deviation and moves the ratio: the learned state differs from a production run's."""
    quiet = tiny_engine.fork(mode="kvshare", target_kl=1e-12)
    taught = tiny_engine.fork(mode="kvshare", target_kl=1e-12)
    _run(quiet)
    _, stats = _run(taught, teach=True)
    assert any(s["relocated_tokens"] for s in stats)
    assert len(taught.anchor_pool()) > len(quiet.anchor_pool())
    assert taught.recompute_ratio() != quiet.recompute_ratio()
    assert taught.stats().mean_kl is None  # teaching alone reports no fidelity
