"""``kvshare bench --workload branches``: N parallel branches over one shared document, its
prefix held once (``share_prefix_tokens``) against a copy per branch, in one process (and
the same as a LangGraph ``Send`` fan-out: ``kvshare.bench.branches_graph``).

Engine run (``prefix`` mode, two engines alike but for ``share_prefix_tokens``): one call
reads the document (~``prefix_tokens``; its KV goes into the prefix cache), then N branches,
each the document and its own question, are released together. Per engine: the steady
decode rate while every branch decodes, the decode KV at its peak (shared prefixes held
plus the rows: allocated, and the tokens in use), and whether each branch's tokens equal
across the two engines.

Step run: one :class:`~kvshare.model.batched.BatchedDecoder` step over N rows of
``prefix_tokens`` + ``suffix_tokens`` each, the prefix held once against N copies (median of
``steps`` steps each, alternating). The bound the issue sets for the decode KV: one
branch's whole KV plus every other branch's own tokens.
"""

from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from pydantic import BaseModel

from kvshare.bench.concurrent import steady_rate
from kvshare.bench.corpus import long_text
from kvshare.engine.engine import Engine
from kvshare.kernels import KV
from kvshare.model.batched import BatchedDecoder, DecodeSlots

QUESTIONS = ("Who is named first?", "List the places.", "What happens last?", "Give a title.",
             "Which numbers appear?", "Summarise in one line.", "What is the tone?",
             "Name a person.")  # fmt: skip


class BranchesRow(BaseModel):
    """One branch count. ``kv_*_mib``: decode KV at its peak (rows allocated, or ``used``:
    their tokens), shared prefixes included; ``bound_mib``: one branch's KV plus the other
    branches' own tokens; ``step_ms``: one decode step (step run)."""

    branches: int
    prefix_tokens: int
    step_ms_shared: float
    step_ms_copies: float
    decode_tok_s_shared: float
    decode_tok_s_copies: float
    kv_mib_shared: float
    kv_mib_copies: float
    kv_used_mib_shared: float
    kv_used_mib_copies: float
    bound_mib: float
    same_tokens: bool


def questions(n: int) -> list[str]:
    """n distinct questions about the document."""
    return [QUESTIONS[i % len(QUESTIONS)] + f" ({i})" for i in range(n)]


def document(base: Engine, tokens: int) -> str:
    """The shared document: the first ``tokens`` tokens of the bench corpus."""
    return base.tokenizer.decode(base.tokenizer(long_text())["input_ids"][:tokens])


def _branch(doc: str, i: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": "You answer questions about the document."},
            {"role": "user", "content": doc},
            {"role": "assistant", "content": "I have read it."},
            {"role": "user", "content": questions(i + 1)[i]}]  # fmt: skip


def _engine_run(base: Engine, doc: str, n: int, new: int, share: int) -> dict:
    eng = base.fork(mode="prefix", share_prefix_tokens=share)
    eng.chat(_branch(doc, 0)[:2], session="w", max_new_tokens=1)  # the document, cached
    peak, used = [0], [0]
    times: list[list[float]] = [[] for _ in range(n)]
    gate = threading.Barrier(n)

    def seen(i: int, _token: int) -> None:
        times[i].append(time.perf_counter())
        slots = eng.batcher.slots if eng.batcher is not None else None
        if slots is not None:
            peak[0] = max(peak[0], slots.nbytes + slots.held_bytes)
            used[0] = max(used[0], slots.used_bytes + slots.held_bytes)

    def one(i: int):
        gate.wait()
        return eng.chat(_branch(doc, i), session="w", max_new_tokens=new,
                        on_token=lambda t: seen(i, t))  # fmt: skip

    with ThreadPoolExecutor(n) as pool:
        out = list(pool.map(one, range(n)))
    lengths = [len(r.tokens) + r.stats.prompt_tokens for r in out]
    shared = min(r.stats.prefix_hit_tokens for r in out)
    return {"tokens": [r.tokens for r in out], "rate": steady_rate(times), "peak": peak[0],
            "used": used[0], "lengths": lengths, "shared": shared}  # fmt: skip


def _step_ms(base: Engine, n: int, prefix: int, suffix: int, steps: int) -> tuple[float, float]:
    """Median ms of one step over n rows: (prefix held once, a copy per row)."""
    layers, heads, dim = base.adapter.kv_dims
    dtype, dev = base.adapter.dtype, base.device
    g = torch.Generator().manual_seed(0)
    shape = (layers, heads, prefix + suffix, dim)
    prompt = KV(torch.randn(shape, generator=g).to(dev, dtype),
                torch.randn(shape, generator=g).to(dev, dtype))  # fmt: skip
    head = (KV(prompt.keys[:, :, :prefix], prompt.values[:, :, :prefix]),)
    step, tokens = BatchedDecoder(base.model), torch.arange(5, 5 + n, device=dev)
    times: dict[bool, list[float]] = {True: [], False: []}
    for shared in (True, False):
        slots = DecodeSlots(base.adapter.kv_dims, dtype, dev)
        for _ in range(n):
            slots.admit(prompt, prompt.length + steps + 1, ("doc", head) if shared else None)
        for _ in range(steps):
            t0 = time.perf_counter()
            step.step(slots, tokens, torch.tensor(slots.positions(), device=dev))
            times[shared].append(time.perf_counter() - t0)
    return statistics.median(times[True]) * 1e3, statistics.median(times[False]) * 1e3


def measure(
    base: Engine,
    branches: tuple[int, ...] = (2, 4, 8),
    prefix_tokens: int = 2048,
    new_tokens: int = 32,
    steps: int = 16,
) -> list[BranchesRow]:
    """The rows (see the module docstring)."""
    doc = document(base, prefix_tokens)
    layers, heads, dim = base.adapter.kv_dims
    token_mib = 2 * layers * heads * dim * base.adapter.dtype.itemsize / 2**20
    rows = []
    for n in branches:
        shared = _engine_run(base, doc, n, new_tokens, 256)
        copies = _engine_run(base, doc, n, new_tokens, 0)
        own = [length - shared["shared"] for length in shared["lengths"]]
        bound = (shared["lengths"][0] + sum(own[1:])) * token_mib
        ms_shared, ms_copies = _step_ms(base, n, shared["shared"], 32, steps)
        rows.append(BranchesRow(
            branches=n, prefix_tokens=shared["shared"], step_ms_shared=ms_shared,
            step_ms_copies=ms_copies, decode_tok_s_shared=shared["rate"],
            decode_tok_s_copies=copies["rate"], kv_mib_shared=shared["peak"] / 2**20,
            kv_mib_copies=copies["peak"] / 2**20, bound_mib=bound,
            kv_used_mib_shared=shared["used"] / 2**20, kv_used_mib_copies=copies["used"] / 2**20,
            same_tokens=shared["tokens"] == copies["tokens"],
        ))  # fmt: skip
    return rows


def markdown(rows: list[BranchesRow]) -> str:
    lines = [
        "| branches | shared prefix (tokens) | decode step held once / copies (ms) | × | steady "
        "decode tok/s held once / copies | decode KV allocated, held once / copies (MiB) | "
        "in use, held once / copies (MiB) | bound: one branch + the others' own (MiB) | "
        "same tokens |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.branches} | {r.prefix_tokens} | {r.step_ms_shared:.1f} / "
            f"{r.step_ms_copies:.1f} | {r.step_ms_shared / r.step_ms_copies:.2f}× | "
            f"{r.decode_tok_s_shared:.1f} / {r.decode_tok_s_copies:.1f} | "
            f"{r.kv_mib_shared:.1f} / {r.kv_mib_copies:.1f} | "
            f"{r.kv_used_mib_shared:.1f} / {r.kv_used_mib_copies:.1f} | {r.bound_mib:.1f} | "
            f"{'yes' if r.same_tokens else 'no'} |"
        )
    return "\n".join(lines) + "\n"
