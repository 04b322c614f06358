"""``kvshare bench --workload wrapper``: what the LangChain layer adds to a call.

The same messages go alternately through ``Engine.chat`` and ``ChatKVShare.invoke`` on one
engine (``prefix`` mode, one generated token, default model ``random:tiny-deep``), so both
reuse the same prefix and do the same work; the difference of the medians is the wrapper's
own cost per call (message conversion, LangChain's callback and config machinery,
metadata, the hint lookup).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from kvshare.engine.engine import Engine

MESSAGES = [
    {"role": "system", "content": "You are the critic. Be brief."},
    {"role": "user", "content": "Check the plan: count the ships, write each name down."},
]


def _ms(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - t0)


def measure(base: Engine, calls: int = 40) -> dict[str, float]:
    """Median ms per call of Engine.chat and ChatKVShare.invoke, and their difference."""
    from kvshare.integrations.langchain import ChatKVShare

    engine = base.fork(mode="prefix")
    model = ChatKVShare(engine=engine, max_tokens=1)

    def direct() -> None:
        engine.chat(MESSAGES, max_new_tokens=1)

    def wrapped() -> None:
        model.invoke(MESSAGES)

    for _ in range(5):  # warm-up: the prefix is cached from here on
        direct()
        wrapped()
    a, b = [], []
    for _ in range(calls):
        a.append(_ms(direct))
        b.append(_ms(wrapped))
    chat, invoke = statistics.median(a), statistics.median(b)
    return {"engine_chat_ms": chat, "chat_kvshare_ms": invoke, "overhead_ms": invoke - chat}
