"""Per-tenant backpressure: requests in flight and their prompt tokens, refused over a cap.

A request holds a :class:`Slot` from the moment its prompt is known until its reply (or
stream) ends, whatever way it ends; over either cap it is refused at once (429 with
``Retry-After``) instead of queueing without bound. Single event loop: no locks needed.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from kvshare.errors import KVShareError


class OverLimitError(KVShareError):
    """A tenant is at its cap of concurrent requests or of queued prompt tokens."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class Slot:
    """One admitted request's share of its tenant's budget; release once (idempotent).
    Until :meth:`started` (its first token) it counts as waiting (the queue depth);
    ``on_start`` runs then, so what it does (a workflow hint) happens only for a call the
    engine accepted."""

    limiter: TenantLimits
    tenant: str
    tokens: int
    held: bool = True
    waiting: bool = True
    on_start: Callable[[], None] | None = None  # runs at the first token only

    def started(self, *_: object) -> None:
        if self.waiting:
            self.waiting = False
            self.limiter.waiting -= 1
            if self.on_start is not None:
                self.on_start()

    def release(self) -> None:
        self.on_start = None  # a request that ends before its first token starts nothing
        self.started()
        if self.held:
            self.held = False
            self.limiter.release(self.tenant, self.tokens)


class TenantLimits:
    """Caps per tenant: ``max_requests`` in flight, ``max_tokens`` prompt tokens in flight."""

    def __init__(self, max_requests: int, max_tokens: int, retry_after_s: int) -> None:
        self.max_requests, self.max_tokens = max_requests, max_tokens
        self.retry_after_s = retry_after_s
        self.requests: dict[str, int] = defaultdict(int)
        self.tokens: dict[str, int] = defaultdict(int)
        self.waiting = 0  # admitted requests before their first token, every tenant

    def acquire(self, tenant: str, prompt_tokens: int) -> Slot:
        """A slot for one request, or OverLimitError naming the cap it would cross. A prompt
        larger than the token cap alone is admitted when the tenant has nothing in flight
        (it could never run otherwise; the context limit bounds it)."""
        if self.requests[tenant] >= self.max_requests:
            raise OverLimitError(
                f"tenant has {self.requests[tenant]} requests in flight "
                f"(max_concurrent={self.max_requests}); retry later",
                self.retry_after_s,
            )
        queued = self.tokens[tenant]
        if queued and queued + prompt_tokens > self.max_tokens:
            raise OverLimitError(
                f"tenant has {queued} prompt tokens in flight; this request's {prompt_tokens} "
                f"would exceed max_queued_prompt_tokens={self.max_tokens}; retry later",
                self.retry_after_s,
            )
        self.requests[tenant] += 1
        self.tokens[tenant] += prompt_tokens
        self.waiting += 1
        return Slot(self, tenant, prompt_tokens)

    def release(self, tenant: str, prompt_tokens: int) -> None:
        self.requests[tenant] -= 1
        self.tokens[tenant] -= prompt_tokens
        if not self.requests[tenant]:
            del self.requests[tenant], self.tokens[tenant]

    def in_flight(self) -> int:
        """Requests in flight over every tenant."""
        return sum(self.requests.values())
