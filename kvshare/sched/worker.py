"""One daemon thread behind a condition variable: the shape of the engine's background
workers (the prefetcher here, the idle-time teacher in ``kvshare.engine.idle``).

A subclass keeps its state under ``_cond``, starts its thread with :meth:`_spawn` and stops
when ``_closed`` is set; :meth:`close` sets it, wakes the thread and joins it. Every worker
is closed at interpreter exit first: a daemon thread killed mid-copy aborts the process.
"""

from __future__ import annotations

import atexit
import threading
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


class Worker:
    """A lazily started daemon thread with a condition and a closed flag."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        atexit.register(_close_at_exit, weakref.ref(self))

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        """Start the thread if it is not running (``_cond`` held)."""
        if self._thread is None and not self._closed:
            self._thread = threading.Thread(target=target, daemon=True, name=name)
            self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker and wait for it (it finishes the step it is in)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)


def _close_at_exit(ref: weakref.ref[Worker]) -> None:
    found = ref()
    if found is not None:
        found.close()


def run_job(job: Callable[[], Any], future: Future[Any]) -> None:
    """Run ``job`` into ``future`` (its result or its exception; nothing if cancelled)."""
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(job())
    except BaseException as exc:  # handed to the caller
        future.set_exception(exc)


class JobRunner(Worker):
    """One thread that runs submitted jobs in order; ``submit`` returns the job's future."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self._queue: deque[tuple[Callable[[], Any], Future[Any]]] = deque()

    def submit(self, job: Callable[[], Any]) -> Future[Any]:
        future: Future[Any] = Future()
        with self._cond:
            self._queue.append((job, future))
            self._spawn(self._run, self.name)
            self._cond.notify_all()
        return future

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._queue or self._closed):
                    self._cond.wait()
                if not self._queue:  # closed, nothing left
                    return
                job, future = self._queue.popleft()
            run_job(job, future)
