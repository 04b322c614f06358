"""Builders shared by tests: team messages, a fingerprint of everything an engine holds,
small stored segments, and a thread runner."""

from __future__ import annotations

from typing import Any

import torch
from kvshare.kernels import KV

from kvshare.model.prompt import token_hash
from kvshare.store.segments import StoredSegment

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


TOKEN_BYTES = 2 * 2 * 1 * 4 * 4  # keys+values, L=2, H=1, D=4, fp32


def kv_for(ids: Any, fill: float | None = None) -> KV:
    """KV [2, 1, n, 4] whose keys hold each token id (values: id + 0.5), or ``fill``."""
    n = len(ids)
    base = torch.tensor(ids, dtype=torch.float32).reshape(1, 1, n, 1).expand(2, 1, n, 4)
    t = base.clone() if fill is None else torch.full((2, 1, n, 4), fill)
    return KV(t, t + 0.5)


def seg(tokens: Any, scope: Any = "t:", chash: str | None = None) -> StoredSegment:
    """A stored prompt segment of ``tokens`` in ``scope`` (content hash of the tokens)."""
    tokens = tuple(tokens)
    return StoredSegment(
        scope, chash or token_hash(tokens), tokens, kv_for(tokens), "prompt", "user", None, 0
    )
