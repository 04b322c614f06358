"""Where reuse comes from, for the exploration notebooks (``notebooks/0*.ipynb``).

The gatherers run workflows on fresh engines over one loaded model, through the public API,
and record every call with the kind of each of its messages (:class:`CallRecord`):
:func:`team_records` (the reference teams), :func:`workload_records` (a bench workload),
:func:`run_topology` (small step graphs, :data:`TOPOLOGIES`). :func:`reuse_by` and
:func:`reuse_by_kind` sum their token counts (reuse as in ``CallStats``: token-weighted,
``1 - computed / prompt tokens``). Fidelity per setting: ``kvshare.explore.fidelity``; time:
``kvshare.explore.time``; figures: ``kvshare.explore.plots``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from kvshare.bench.workloads import SyntheticWorkload, Workload
from kvshare.engine.engine import ChatResult, Engine
from kvshare.engine.stats import CallStats, MessageReuse
from kvshare.model.prompt import normalize

KINDS = (
    "system prompt",
    "user question",
    "retrieved passage",
    "agent reply",
    "tool output",
    "instruction",
    "template",
)
"""Segment kinds of :func:`message_kinds` (``template``: the generation prompt's tokens)."""
DOC_MARKERS = ("Passages:", "Document:")


class RecordingEngine(Engine):
    """An :class:`Engine` that also keeps every call's messages (normalised) and result."""

    def __init__(self, loaded: Any, config: Any = None) -> None:
        super().__init__(loaded, config)
        self.records: list[tuple[list[dict[str, Any]], ChatResult]] = []

    def chat(self, messages: Any, *args: Any, **kwargs: Any) -> ChatResult:
        result = super().chat(messages, *args, **kwargs)
        self.records.append((normalize(messages), result))
        return result


def recording(base: Engine, **options: Any) -> RecordingEngine:
    """A :class:`RecordingEngine` on ``base``'s model with ``base``'s config and ``options``
    (empty stores, as ``Engine.fork``)."""
    return RecordingEngine(base.loaded, base.config.with_options(**options))


@dataclass(frozen=True)
class CallRecord:
    """One call: the run it belongs to, its mode, its index in its session (``position``),
    its stats, the kind of each entry of ``stats.message_reuse``, its messages and reply."""

    run: str
    mode: str
    position: int
    stats: CallStats
    kinds: tuple[str, ...]
    messages: tuple[dict[str, Any], ...]
    tokens: tuple[int, ...]


def message_kinds(
    messages: Sequence[dict[str, Any]], replies: Iterable[str], documents: Iterable[str] = ()
) -> tuple[str, ...]:
    """The kind (:data:`KINDS`) of every message, then ``template`` for the generation tail.

    system: system prompt (a tool block too); tool: tool output; assistant: agent reply; a
    user message is an agent reply when it quotes an earlier reply of the run (``replies``,
    12+ characters), a retrieved passage when it starts with a :data:`DOC_MARKERS` marker or
    holds one of ``documents`` (a ``Question:`` inside it is counted with it and is the
    call's question), the first other user message the user question, later ones
    instructions.
    """
    quoted = [r.strip() for r in replies if len(r.strip()) >= 12]
    docs = [d for d in documents if d]
    kinds, asked = [], False
    fixed = {"system": "system prompt", "tool": "tool output", "assistant": "agent reply"}
    for m in messages:
        text = str(m.get("content") or "")
        if m["role"] in fixed:
            kinds.append(fixed[m["role"]])
        elif any(q in text for q in quoted):
            kinds.append("agent reply")
        elif text.lstrip().startswith(DOC_MARKERS) or any(d in text for d in docs):
            kinds.append("retrieved passage")
            asked = asked or "Question:" in text
        else:
            kinds.append("instruction" if asked else "user question")
            asked = True
    return (*kinds, "template")


def records_of(
    engine: RecordingEngine, run: str, documents: Iterable[str] = ()
) -> list[CallRecord]:
    """``engine``'s recorded calls as :class:`CallRecord` (replies tracked per session)."""
    docs, out = tuple(documents), []
    replies: dict[str | None, list[str]] = {}
    for msgs, res in engine.records:
        seen = replies.setdefault(res.stats.session, [])
        kinds = message_kinds(msgs, seen, docs)
        out.append(
            CallRecord(
                run, res.stats.mode, len(seen), res.stats, kinds, tuple(msgs), tuple(res.tokens)
            )
        )
        seen.append(res.text)
    return out


def team_records(
    base: Engine,
    name: str,
    items: int = 1,
    mode: str = "kvshare",
    shadow: bool = False,
    offset: int = 0,
) -> list[CallRecord]:
    """Reference team ``name`` (rag, debate, code) over its items ``offset..offset+items-1``
    on one fresh engine in ``mode``; every call recorded."""
    from kvshare.agents.teams import get_team
    from kvshare.agents.teams.base import run_team

    team = get_team(name)
    engine = recording(base, mode=mode)
    run_team(engine, team, team.items(items, offset), shadow=shadow)
    return records_of(engine, name)


def workload_records(
    engine: RecordingEngine,
    wl: Workload,
    run: str,
    shadow: bool = False,
    items: Iterable[int] | None = None,
) -> list[CallRecord]:
    """Items of ``wl`` (all by default) in order on ``engine``, agent i seeing the replies of
    agents < i; item k runs as session ``<run>-<k>``."""
    start = len(engine.records)
    for item in range(wl.n_items) if items is None else items:
        outputs: list[str] = []
        for i in range(wl.n_agents):
            msgs = wl.messages(i, outputs, item)
            r = engine.chat(
                msgs,
                agent=wl.agent_name(i),
                session=f"{run}-{item}",
                max_new_tokens=wl.max_new_tokens,
                shadow=shadow,
            )
            outputs.append(r.text)
    return records_of(engine, run, getattr(wl, "inputs", ()))[start:]


class Reuse(NamedTuple):
    """Token counts of a group of prompts (or messages): prompt = prefix_hit + relocated +
    computed; recomputed is part of computed."""

    prompt: int
    prefix_hit: int
    relocated: int
    recomputed: int
    computed: int

    @property
    def rate(self) -> float:
        return 1.0 - self.computed / self.prompt if self.prompt else 0.0

    def plus(self, other: Reuse) -> Reuse:
        return Reuse(*(a + b for a, b in zip(self, other, strict=True)))


ZERO = Reuse(0, 0, 0, 0, 0)


def _of_call(s: CallStats) -> Reuse:
    return Reuse(
        s.prompt_tokens,
        s.prefix_hit_tokens,
        s.relocated_tokens,
        s.recomputed_tokens,
        s.computed_tokens,
    )


def _of_message(m: MessageReuse) -> Reuse:
    return Reuse(m.tokens, m.prefix_hit, m.relocated, m.recomputed, m.computed)


def reuse_by(records: Iterable[CallRecord], key: Callable[[CallRecord], str]) -> dict[str, Reuse]:
    """Token counts summed per ``key(record)`` (in first-seen order)."""
    out: dict[str, Reuse] = {}
    for r in records:
        out[key(r)] = out.get(key(r), ZERO).plus(_of_call(r.stats))
    return out


def reuse_by_kind(records: Iterable[CallRecord]) -> dict[str, Reuse]:
    """Token counts summed per segment kind (every message of every call), in KINDS order."""
    out = dict.fromkeys(KINDS, ZERO)
    for r in records:
        for kind, m in zip(r.kinds, r.stats.message_reuse, strict=True):
            out[kind] = out[kind].plus(_of_message(m))
    return {k: v for k, v in out.items() if v.prompt}


# ------------------------------------------------------------------ topologies


class Step(NamedTuple):
    """One call of a topology: ``agent`` (an index into the workload's agent prefixes) reads
    the shared input, then the replies of the earlier steps ``sees`` (in that order)."""

    agent: int
    sees: tuple[int, ...] = ()


TOPOLOGIES: dict[str, tuple[Step, ...]] = {
    "chain": (Step(0), Step(1, (0,)), Step(2, (1,)), Step(3, (2,))),
    "star": (Step(0), Step(1, (0,)), Step(2, (0,)), Step(3, (0,)), Step(0, (1, 2, 3))),
    "fully connected": (Step(0), Step(1, (0,)), Step(2, (0, 1)), Step(3, (0, 1, 2))),
    "debate rounds": (Step(0), Step(1), Step(0, (0, 1)), Step(1, (1, 0)), Step(2, (2, 3))),
    "fan-out": (Step(0), Step(1, (0,)), Step(2, (0,)), Step(3, (0,)), Step(4, (1, 2, 3))),
}
"""Small step graphs over the synthetic workload's agents (star: a hub, three spokes, the
hub again; debate: two debaters, a second round that reads both, a judge; fan-out: a
planner, three workers, a joiner)."""


def run_topology(
    base: Engine, steps: Sequence[Step], wl: SyntheticWorkload, run: str, mode: str = "kvshare"
) -> list[CallRecord]:
    """``steps`` on a fresh engine in ``mode``, once per item of ``wl`` (in a row): agent
    ``s.agent``'s prefix, the item's shared input, the replies of ``s.sees`` as assistant
    messages."""
    engine = recording(base, mode=mode)
    for item in range(wl.n_items):
        _topology_item(engine, steps, wl, run, item)
    return records_of(engine, run, wl.inputs)


def _topology_item(
    engine: Engine, steps: Sequence[Step], wl: SyntheticWorkload, run: str, item: int
) -> None:
    replies: list[str] = []
    for s in steps:
        msgs = [
            {"role": "system", "content": wl.prefixes[s.agent % wl.n_agents]},
            {"role": "user", "content": wl.inputs[item]},
        ]
        msgs += [{"role": "assistant", "content": replies[j]} for j in s.sees]
        r = engine.chat(
            msgs, agent=f"agent{s.agent}", session=f"{run}-{item}", max_new_tokens=wl.max_new_tokens
        )
        replies.append(r.text)


def fmt_reuse(table: dict[str, Reuse]) -> str:
    """A text table: tokens, prefix hit, relocated, recomputed, computed, reuse per group."""
    head = f"{'':20} {'tokens':>7} {'prefix':>7} {'reloc':>7} {'recomp':>7} {'comp':>7} reuse"
    rows = [
        f"{k:20} {v.prompt:7} {v.prefix_hit:7} {v.relocated:7} {v.recomputed:7} "
        f"{v.computed:7} {v.rate:6.1%}"
        for k, v in table.items()
    ]
    return "\n".join([head, *rows])
