"""Fair turns on the model: one call at a time, served in arrival order.

Fairness rule (documented in docs/design.md): a call's prefill runs whole; its decode runs in
slices of ``EngineConfig.decode_slice`` tokens, and between slices the call hands the model
to the longest-waiting call, then queues again behind the calls that arrived meanwhile.
One ``max_new_tokens`` giant therefore delays others by at most one prefill or one slice.
"""

from __future__ import annotations

import threading
from collections import deque
from types import TracebackType


class TurnLock:
    """A FIFO lock: waiting threads acquire it in the order they asked for it.

    ``pass_turn()`` (holder only) lets every thread already waiting go first, then takes
    the lock back; with nobody waiting it returns at once.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()
        self._held = False

    def acquire(self) -> None:
        me = object()
        with self._cond:
            self._queue.append(me)
            while self._held or self._queue[0] is not me:
                self._cond.wait()
            self._queue.popleft()
            self._held = True

    def release(self) -> None:
        with self._cond:
            self._held = False
            self._cond.notify_all()

    @property
    def waiting(self) -> int:
        """Threads queued for the lock now."""
        with self._cond:
            return len(self._queue)

    def pass_turn(self) -> None:
        """Let the calls waiting now run first (holder only)."""
        if self.waiting:
            self.release()
            self.acquire()

    def __enter__(self) -> TurnLock:
        self.acquire()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
