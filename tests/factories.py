"""Builders shared by tests: team messages and a fingerprint of everything an engine holds."""

from __future__ import annotations

from typing import Any

DOC = "The lighthouse keeper counted ships every night and wrote each name in a ledger. " * 4


# Every rotary scaling variant kvshare re-rotates with (the default, then scaled ones).
ROPE_VARIANTS = [
    None,
    {"rope_type": "linear", "factor": 2.0},
    {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 512,
    },
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024},
]


def team(role: str, doc: str = DOC, extra: list[dict[str, str]] | None = None) -> list[dict]:
    """A team member's prompt: its role, then the shared document, then ``extra``."""
    return [
        {"role": "system", "content": f"You are the {role}. Be brief and factual."},
        {"role": "user", "content": doc},
        *(extra or []),
    ]


def fingerprint(engine: Any) -> tuple:
    """Everything a call may change, through the public API: stored bytes per store, scopes,
    traces, every scope's learned state (pool contents, gains, hits, ratio) and the ledger."""
    s = engine.stats()
    return (
        tuple(engine.memory()),
        engine.prefix_cache.scopes,
        len(engine.segments),
        engine.learned.fingerprint(),
        (s.calls, s.prompt_tokens, s.computed_tokens, s.mean_kl),
        len(engine.calls),
    )


def run_threads(work: Any, n: int = 4) -> list[BaseException]:
    """Run ``work(i)`` on ``n`` threads at once; the exceptions they raised."""
    import threading

    errors: list[BaseException] = []

    def guarded(i: int) -> None:
        try:
            work(i)
        except BaseException as exc:  # noqa: BLE001 - returned to the test
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors
