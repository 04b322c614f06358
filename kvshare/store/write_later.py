"""Writes to a shared tier made after a call has let the model go.

A call's end (``kvshare.engine.call.finish``) runs in a turn on the model; writing its KV
through to a shared tier (``kvshare.store.shared``: serialise, hash, seal, send; ~75 ms for a
733-token trace of the embedded model to a local Redis) would hold every other call for that
long. Inside :func:`collected`, writes on this thread are kept instead of run; the caller
runs them (:func:`run_all`; an asyncio caller hands them to one thread for every engine, not
one per call: ``kvshare.engine.call``) once the turn is released and before the call returns,
so what a call wrote is readable by other replicas when its result is, as before.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

Write = Callable[[], Any]
_local = threading.local()


@contextmanager
def collected() -> Iterator[list[Write]]:
    """Writes made through :func:`write` on this thread inside are appended to the yielded
    list, not run (nested: the innermost collects)."""
    pending: list[Write] = []
    outer = getattr(_local, "pending", None)
    _local.pending = pending
    try:
        yield pending
    finally:
        _local.pending = outer


def write(fn: Write) -> None:
    """Run ``fn`` now, or keep it for later when this thread is collecting."""
    pending = getattr(_local, "pending", None)
    if pending is None:
        fn()
    else:
        pending.append(fn)


def run_all(pending: Sequence[Write]) -> None:
    """Run the collected writes in order (shared tiers never raise for their service)."""
    for fn in pending:
        fn()
