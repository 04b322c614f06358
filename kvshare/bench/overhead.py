"""Overhead benchmark: what a call costs outside the model's layers, and the honest baseline.

Runs the synthetic workflow on a model whose arithmetic is negligible (``random:tiny-deep``:
32 layers of width 64 by default), so TTFT minus the time inside the decoder layers is
kvshare's own per-call overhead (render, match, assembly, anchor estimate, token choice,
masks, sampling). Calls generate one token, so every layer forward is part of the prefill.
Beside every ``full`` call a bare ``model(ids, logits_to_keep=1)`` forward of the same prompt
is timed (design.md §5: ``full`` must be within 10% of it).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from pydantic import BaseModel
from tqdm.auto import tqdm

from kvshare.bench.corpus import long_text
from kvshare.bench.host_reads import before_first_token, count_host_reads
from kvshare.bench.workloads import SyntheticWorkload
from kvshare.engine.engine import Engine
from kvshare.engine.profile import BEFORE_FIRST_TOKEN, LayerTimer, synchronize
from kvshare.model.prompt import render


class OverheadRow(BaseModel):
    """Medians over the calls of one mode at one shared-input length (milliseconds)."""

    mode: str
    input_len: int
    prompt_tokens: float
    ttft_ms: float
    layers_ms: float
    overhead_ms: float
    stages_ms: dict[str, float]
    bare_forward_ms: float | None = None
    host_reads: float | None = None  # median reads of tensor values before the first token


@torch.inference_mode()
def bare_forward_s(engine: Engine, ids: Sequence[int]) -> float:
    """Seconds of one plain causal forward of ``ids`` keeping only the last logits."""
    dev = engine.device
    x = torch.tensor([list(ids)], device=dev)
    synchronize(dev)
    t0 = time.perf_counter()
    engine.model(input_ids=x, logits_to_keep=1, use_cache=False)
    synchronize(dev)
    return time.perf_counter() - t0


def _call_rows(engine: Engine, w: SyntheticWorkload, item: int) -> list[dict[str, Any]]:
    outputs: list[str] = []
    rows = []
    for i in range(w.n_agents):
        msgs = w.messages(i, outputs, item)
        with LayerTimer(engine.model) as lt:
            r = engine.chat(msgs, agent=w.agent_name(i), session="o", max_new_tokens=1)
        outputs.append(f"reply {i} of item {item}: " + "ok " * 40)  # fixed, long replies
        row = {"s": r.stats, "layers": lt.seconds}
        if engine.config.mode == "full":
            row["bare"] = bare_forward_s(engine, render(engine.tokenizer, msgs).ids)
        rows.append(row)
    return rows


def _summary(mode: str, length: int, rows: list[dict[str, Any]]) -> OverheadRow:
    med = statistics.median
    ttft = [r["s"].ttft_s for r in rows]
    stages = {
        name: 1e3 * med([(r["s"].stages or {}).get(name, 0.0) for r in rows])
        for name in BEFORE_FIRST_TOKEN
    }
    bare = [r["bare"] for r in rows if "bare" in r]
    return OverheadRow(
        mode=mode,
        input_len=length,
        prompt_tokens=med([r["s"].prompt_tokens for r in rows]),
        ttft_ms=1e3 * med(ttft),
        layers_ms=1e3 * med([r["layers"] for r in rows]),
        overhead_ms=1e3 * med([r["s"].ttft_s - r["layers"] for r in rows]),
        stages_ms=stages,
        bare_forward_ms=1e3 * med(bare) if bare else None,
    )


def _host_reads(engine: Engine, w: SyntheticWorkload, item: int) -> float:
    """Median host reads before the first token over one untimed workflow (the counter's
    wrappers slow every tensor index, so it never runs beside the timed calls)."""
    outputs: list[str] = []
    reads = []
    for i in range(w.n_agents):
        msgs = w.messages(i, outputs, item)
        with count_host_reads() as counts:
            engine.chat(msgs, agent=w.agent_name(i), session="o", max_new_tokens=1)
        reads.append(before_first_token(counts))
        outputs.append(f"reply {i} of item {item}: " + "ok " * 40)
    return statistics.median(reads)


def measure(
    base: Engine,
    lengths: Sequence[int] = (256, 512, 1024, 2048),
    modes: Sequence[str] = ("full", "prefix", "blend", "kvshare"),
    items: int = 2,
    agents: int = 5,
) -> list[OverheadRow]:
    """One row per (mode, shared-input length); every mode runs the same calls, interleaved
    per item, from empty stores."""
    text = long_text()
    out = []
    for length in tqdm(lengths, desc="overhead", leave=False):
        w = SyntheticWorkload(
            base.tokenizer, text, n_agents=agents, prefix_len=128, input_len=length,
            output_len=1, n_items=items + 1,
        )  # fmt: skip
        engines = {m: base.fork(mode=m, profile=True) for m in modes}
        rows: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
        for item in range(items):
            for mode in modes:
                rows[mode] += _call_rows(engines[mode], w, item)
        for m in modes:
            row = _summary(m, length, rows[m])
            out.append(row.model_copy(update={"host_reads": _host_reads(engines[m], w, items)}))
    return out


def markdown(rows: Sequence[OverheadRow]) -> str:
    """One line per row: TTFT, layers, overhead and the stages before the first token."""
    head = "| mode | input | prompt tokens | TTFT | in layers | overhead | "
    head += " | ".join(BEFORE_FIRST_TOKEN) + " | bare forward | host reads |"
    lines = [head, "|" + "---|" * (8 + len(BEFORE_FIRST_TOKEN))]
    for r in rows:
        stages = " | ".join(f"{r.stages_ms[s]:.2f}" for s in BEFORE_FIRST_TOKEN)
        bare = "–" if r.bare_forward_ms is None else f"{r.bare_forward_ms:.2f}"
        reads = "–" if r.host_reads is None else f"{r.host_reads:.0f}"
        lines.append(
            f"| {r.mode} | {r.input_len} | {r.prompt_tokens:.0f} | {r.ttft_ms:.2f} | "
            f"{r.layers_ms:.2f} | {r.overhead_ms:.2f} | {stages} | {bare} | {reads} |"
        )
    return "\n".join(lines) + (
        "\n\n(milliseconds, medians over every call of the workflow; host reads: median "
        "reads of tensor values on the host before the first token, each a device sync on a "
        "GPU, counted on one more untimed workflow)\n"
    )
