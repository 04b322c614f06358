"""Prometheus metrics of one server (its own registry, so several apps can live in a process).

Counters and histograms are updated as requests end; gauges of the engine (store bytes per
store, requests in flight, decode batch) are read when ``/metrics`` is scraped.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from kvshare.engine.results import ChatResult

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """The server's metrics (names prefixed ``kvshare_``)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "kvshare_requests", "HTTP requests by route and status", ["route", "status"],
            registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "kvshare_ttft_seconds", "engine time to first token", buckets=_SECONDS, registry=r
        )
        self.latency = Histogram(
            "kvshare_request_seconds", "chat request latency, whole reply", buckets=_SECONDS,
            registry=r,
        )  # fmt: skip
        self.tokens = Counter(
            "kvshare_prompt_tokens", "prompt tokens by how they were served", ["kind"], registry=r
        )
        self.output = Counter("kvshare_output_tokens", "generated tokens", registry=r)
        self.store = Gauge("kvshare_store_bytes", "bytes held per store", ["store"], registry=r)
        self.tiers = Gauge("kvshare_tier_bytes", "trace store bytes per tier", ["tier"], registry=r)
        self.queue = Gauge(
            "kvshare_queue_depth", "admitted chat requests before their first token", registry=r
        )
        self.in_flight = Gauge("kvshare_requests_in_flight", "chat requests admitted", registry=r)
        self.batch = Gauge("kvshare_decode_batch_mean", "mean decode batch so far", registry=r)
        self.steps = Gauge("kvshare_decode_steps", "batched decode steps run", registry=r)

    def observe_call(self, result: ChatResult, seconds: float) -> None:
        """Record one finished call."""
        s = result.stats
        self.ttft.observe(s.ttft_s)
        self.latency.observe(seconds)
        reused = s.prefix_hit_tokens + s.relocated_tokens
        self.tokens.labels("reused").inc(reused)
        self.tokens.labels("recomputed").inc(s.recomputed_tokens)
        self.tokens.labels("computed").inc(s.computed_tokens)
        self.output.inc(s.output_tokens)

    def render(self, engine: Any, in_flight: int, waiting: int) -> bytes:
        """The exposition text, engine gauges read now (``in_flight``: admitted requests,
        ``waiting``: those of them before their first token)."""
        mem = engine.memory()
        for name in ("prefix_cache", "segments", "anchors"):
            self.store.labels(name).set(getattr(mem, name))
        tier_bytes = getattr(engine.segments, "tier_bytes", None)  # tiered stores only
        for tier, used in (tier_bytes() if tier_bytes else {"device": mem.segments}).items():
            self.tiers.labels(tier).set(used)
        self.in_flight.set(in_flight)
        self.queue.set(waiting)
        if engine.batcher is not None:
            b = engine.batcher.stats()
            self.batch.set(b["mean_batch"])
            self.steps.set(b["steps"])
        return generate_latest(self.registry)


def merge(texts: dict[str, bytes]) -> bytes:
    """The exposition texts of several replicas as one: every sample gains a ``replica``
    label (the dict's key), each family's samples stay together under its first header."""
    families: dict[str, list[str]] = {}
    for replica, text in texts.items():
        name = ""
        for line in text.decode().splitlines():
            if line.startswith("# HELP "):
                name = line.split()[2]
                if name in families:
                    continue
                families[name] = [line]
            elif line.startswith("#"):
                if len(families.get(name, ())) == 1:  # the TYPE line, first replica only
                    families[name].append(line)
            elif line.strip():
                families.setdefault(name, []).append(_labelled(line, replica))
    return "".join(line + "\n" for lines in families.values() for line in lines).encode()


def _labelled(sample: str, replica: str) -> str:
    """``name{a="b"} v`` -> ``name{replica="R",a="b"} v`` (and ``name v`` likewise)."""
    label = f'replica="{replica}"'
    head, sep, rest = sample.partition("{")
    if sep:
        return f"{head}{{{label}{'' if rest.startswith('}') else ','}{rest}"
    name, _, value = sample.partition(" ")
    return f"{name}{{{label}}} {value}"
