"""Per-call stage times and time spent inside the model's decoder layers.

Off by default and then free: no clock reads, no device synchronisation. With
``EngineConfig(profile=True)`` every stage edge synchronises the device (so that GPU work is
charged to the stage that launched it) and ``CallStats.stages`` holds seconds per stage;
profiled TTFTs are therefore a little slower than unprofiled ones and are not quoted as such.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from kvshare.model.adapter import ModelAdapter

STAGES = (
    "render",
    "plan",
    "assemble",
    "estimate",
    "choose",
    "prefill",
    "sample",
    "learn",
    "decode",
    "remember",
    "shadow",
)
BEFORE_FIRST_TOKEN = STAGES[:7]


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StageClock:
    """Seconds per named stage of one call; a disabled clock does nothing."""

    def __init__(self, enabled: bool, device: torch.device) -> None:
        self.enabled = enabled
        self.device = device
        self.times: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        synchronize(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0

    def add(self, name: str, seconds: float) -> None:
        if self.enabled:
            self.times[name] = self.times.get(name, 0.0) + seconds

    def result(self) -> dict[str, float] | None:
        return dict(self.times) if self.enabled else None


class LayerTimer:
    """Wall time spent inside a model's decoder layers (forward hooks; device-synchronised).

    ``with LayerTimer(model) as lt: ...``; ``lt.seconds`` is the total since entry. What a
    call spends outside the layers (planning, assembly, masks, sampling) is TTFT minus this.
    """

    def __init__(self, model: Any) -> None:
        self.layers = ModelAdapter(model).layers
        self.device = next(model.parameters()).device
        self.seconds = 0.0
        self._t0 = 0.0
        self._handles: list[Any] = []

    def _pre(self, *_: Any) -> None:
        synchronize(self.device)
        self._t0 = time.perf_counter()

    def _post(self, *_: Any) -> None:
        synchronize(self.device)
        self.seconds += time.perf_counter() - self._t0

    def __enter__(self) -> LayerTimer:
        for layer in self.layers:
            self._handles.append(layer.register_forward_pre_hook(self._pre))
            self._handles.append(layer.register_forward_hook(self._post))
        return self

    def __exit__(self, *_: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
