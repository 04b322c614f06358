"""``kvshare demo``: a team of agents answers one real question over one real document.

Each agent has its own role and sees the document, the question and the earlier agents'
answers. Every agent call runs under ``full`` (prefill everything) and the best available
mode side by side on the same messages; the table shows TTFT, speedup, reuse and fidelity.

Wing: the applications. May import: ``kvshare.engine`` and below, ``kvshare.agents`` and
``kvshare.bench``.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from kvshare.agents.teams import QA_TEAM
from kvshare.bench.corpus import QAItem, demo_item
from kvshare.engine.engine import ChatResult, Engine

BEST_MODE = "kvshare"


def team_messages(item: QAItem, answers: list[str], instruction: str) -> list[dict[str, str]]:
    """Shared document and question first, then earlier answers, then this agent's role
    instruction (``kvshare.agents.teams.QA_TEAM``)."""
    msgs = [
        {
            "role": "system",
            "content": "You are part of a team answering questions about a "
            f"document.\n\nDocument:\n{item.context}",
        },
        {"role": "user", "content": f"Question: {item.question}"},
    ]
    msgs += [{"role": "assistant", "content": a} for a in answers]
    msgs.append({"role": "user", "content": instruction})
    return msgs


def _row(name: str, full: ChatResult, best: ChatResult) -> str:
    f, b = full.stats, best.stats
    return (
        f"| {name:<9} | {b.prompt_tokens:>6} | {f.ttft_s * 1000:>8.0f} | {b.ttft_s * 1000:>8.0f} "
        f"| {f.ttft_s / b.ttft_s:>6.2f}× | {b.reuse_rate:>6.1%} | {b.kl or 0.0:>8.2e} "
        f"| {'yes' if b.top1_agree else 'no':>5} | {b.greedy_match:>6} |"
    )


def run_demo(engine: Engine, max_new_tokens: int = 48, out: TextIO = sys.stdout) -> None:
    item = demo_item()
    full, best = engine.fork(mode="full"), engine.fork(mode=BEST_MODE)
    print(
        f"Document ({item.source}): {item.title}\nQuestion: {item.question}\n"
        f"Gold answer: {item.answers[0]}\n",
        file=out,
    )
    header = (
        f"| agent     | prompt | full TTFT ms | {BEST_MODE} TTFT ms | speedup | reuse  | KL       "
        "| top-1 | greedy |"
    )
    rows = [header, "|" + "---|" * 9]
    answers: list[str] = []
    full.chat([{"role": "user", "content": "Hello"}], max_new_tokens=2)  # warm-up, not shown
    full.reset()
    t0 = time.perf_counter()
    for name, instruction in QA_TEAM:
        msgs = team_messages(item, answers, instruction)
        r_full = full.chat(msgs, agent=name, max_new_tokens=max_new_tokens)
        r_best = best.chat(msgs, agent=name, max_new_tokens=max_new_tokens, shadow=True)
        rows.append(_row(name, r_full, r_best))
        answers.append(r_best.text.strip())
    print("\n".join(rows), file=out)
    total = best.stats()
    print(
        f"\n{BEST_MODE}: token reuse {total.reuse_rate:.1%} over {total.calls} calls; "
        f"wall time {time.perf_counter() - t0:.1f} s\n",
        file=out,
    )
    for (name, _), answer in zip(QA_TEAM, answers, strict=True):
        print(f"[{name}] {answer}\n", file=out)


def run_team_demo(
    engine: Engine, name: str, items: int | None = None, out: TextIO = sys.stdout
) -> None:
    """A reference team (``kvshare.agents.teams``) under ``full`` and ``kvshare`` on the same
    items: score, reuse, fidelity and per-agent TTFT, then each item's final answer."""
    from kvshare.agents.teams import get_team
    from kvshare.bench.teams import markdown, run_team_bench

    team = get_team(name)
    chosen = team.items(items or team.default_items)
    print(f"{team.title}: {len(chosen)} item(s)", file=out)
    for item in chosen:
        print(f"- {team.describe(item)}", file=out)
    t0 = time.perf_counter()
    rep = run_team_bench(engine, team, chosen, ("full", BEST_MODE), wrapper=False)
    print("\n" + markdown(rep), file=out)
    print(f"wall time {time.perf_counter() - t0:.1f} s\n", file=out)
    for m in rep.modes:
        for answer in m.answers:
            print(f"[{m.mode}] {answer[:300]}", file=out)
