"""Where a masked partial prefill stops paying off against an ordinary causal prefill."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch

from kvshare.engine.engine import Engine
from kvshare.kernels import KV, output_cache, partial_prefill


def _time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(
    engine: Engine,
    length: int = 2048,
    ratios: Sequence[float] = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0),
    repeats: int = 3,
) -> list[tuple[float, float]]:
    """(ratio, masked_time / causal_time) for random subsets of ``length`` tokens."""
    dev = engine.device
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, engine.tokenizer.vocab_size, (length,), generator=gen).to(dev)
    pos = torch.arange(length, device=dev)
    with torch.inference_mode():
        out = engine.model(input_ids=ids[None], position_ids=pos[None], use_cache=True)
    kv = KV.from_cache(output_cache(out))
    causal = _time(
        lambda: partial_prefill(engine.model, kv, ids, pos, pos, max_masked_ratio=0.0), repeats
    )
    rows = []
    for r in ratios:
        sel = torch.randperm(length, generator=gen)[: max(1, int(r * length))].to(dev)
        sel = torch.cat([sel, torch.tensor([0], device=dev)])  # span starts at token 0
        t = _time(
            lambda s=sel: partial_prefill(engine.model, kv, ids, pos, s, max_masked_ratio=1.0),
            repeats,
        )
        rows.append((r, t / causal))
    return rows
