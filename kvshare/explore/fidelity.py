"""Reuse against fidelity, for the exploration notebooks (``notebooks/02_fidelity_tradeoff``).

:func:`setting_point` / :func:`sweep` / :func:`pareto_points`: one cold pass per setting, its
reuse, realized recompute, first-token KL, top-1, greedy match and task score (the grid of
``kvshare.bench.pareto``); :func:`learning_curve`: reuse question by question as the anchor
pool learns; :func:`kv_errors`: the KV each call used against a full prefill, per layer and
token (:func:`layer_profile`, :func:`run_start_profile`); :func:`precision_points`: dtypes.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import torch

from kvshare.bench.pareto import GAMMAS, RATIOS, matched_ratio
from kvshare.bench.workloads import Workload
from kvshare.engine.engine import Engine
from kvshare.engine.stats import CallStats, aggregate
from kvshare.explore.reuse import CallRecord, recording, workload_records


class Point(NamedTuple):
    """One cold pass of a workload under one setting (``options`` of ``EngineConfig``).

    realized: recomputed / (relocated + recomputed) tokens, as ``bench.pareto``; kl, top1,
    greedy: mean first-token KL, top-1 agreement, median greedy match (of 32) against a
    full prefill (None without shadow); score: the workload's task score, points 0..100.
    """

    mode: str
    setting: str
    reuse: float
    realized: float
    kl: float | None
    top1: float | None
    greedy: float | None
    score: float | None
    anchors_bytes: int


def point_of(
    mode: str,
    setting: str,
    calls: Sequence[CallStats],
    scores: Sequence[float],
    anchors_bytes: int = 0,
) -> Point:
    """Summarise a pass's calls and task scores (0..1) as a :class:`Point`."""
    agg = aggregate(calls)
    reusable = sum(c.relocated_tokens + c.recomputed_tokens for c in calls)
    realized = sum(c.recomputed_tokens for c in calls) / reusable if reusable else 0.0
    score = 100 * statistics.fmean(scores) if scores else None
    return Point(
        mode,
        setting,
        agg.reuse_rate,
        realized,
        agg.mean_kl,
        agg.top1_agree_rate,
        agg.median_greedy_match,
        score,
        anchors_bytes,
    )


def fmt_points(points: Iterable[Point]) -> str:
    """A text table of points: reuse, realized recompute, KL, top-1, greedy, score."""

    def f(x: float | None, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    head = f"{'mode':8} {'setting':16} {'reuse':>6} {'recomp':>6} {'KL':>8} {'top1':>5} "
    rows = [head + f"{'greedy':>6} {'score':>5}"]
    for p in points:
        rows.append(
            f"{p.mode:8} {p.setting:16} {p.reuse:6.1%} {p.realized:6.1%} {f(p.kl, '8.4f')} "
            f"{f(p.top1, '5.0%')} {f(p.greedy, '6.0f')} {f(p.score, '5.1f')}"
        )
    return "\n".join(rows)


def setting_point(
    base: Engine, wl: Workload, mode: str, setting: str = "", shadow: bool = True, **options: Any
) -> Point:
    """One cold pass of every item of ``wl`` on a fork of ``base`` in ``mode`` with
    ``options`` (``recompute_ratio``, ``anchor_gamma``, ``neighbours``, ...)."""
    engine = base.fork(mode=mode, **options)
    calls, scores = [], []
    for item in range(wl.n_items):
        outputs: list[str] = []
        for i in range(wl.n_agents):
            r = engine.chat(
                wl.messages(i, outputs, item),
                agent=wl.agent_name(i),
                session=f"p-{item}",
                max_new_tokens=wl.max_new_tokens,
                shadow=shadow and mode != "full",
            )
            outputs.append(r.text)
            calls.append(r.stats)
        score = wl.score(item, outputs)
        scores += [score] if score is not None else []
    return point_of(mode, setting, calls, scores, engine.memory().anchors)


def sweep(
    base: Engine, wl: Workload, mode: str, name: str, values: Iterable[Any], **fixed: Any
) -> list[Point]:
    """:func:`setting_point` for every value of option ``name`` (setting ``name=value``)."""
    return [setting_point(base, wl, mode, f"{name}={v}", **{**fixed, name: v}) for v in values]


def pareto_points(
    base: Engine, wl: Workload, ratios: Sequence[float] = RATIOS, gammas: Sequence[float] = GAMMAS
) -> list[Point]:
    """``bench.pareto``'s grid with greedy match and task score: ``prefix``; ``blend`` and
    ``kvshare`` (``adaptive=False``) at every ratio; ``anchor`` at every entropy gate, and
    ``kvshare`` at the nominal ratio matching each ``anchor`` pass's realized recompute
    (``match=gamma``; the floor is ``kvshare``'s realized ratio at the first of ``ratios``,
    0 in the default grid)."""
    points = [setting_point(base, wl, "prefix", "exact prefix")]
    for r in ratios:
        points.append(setting_point(base, wl, "blend", f"ratio={r}", recompute_ratio=r))
        points.append(
            setting_point(base, wl, "kvshare", f"ratio={r}", recompute_ratio=r, adaptive=False)
        )
    anchors = [setting_point(base, wl, "anchor", f"gamma={g}", anchor_gamma=g) for g in gammas]
    floor = next(p.realized for p in points if p.mode == "kvshare")
    for g, a in zip(gammas, anchors, strict=True):
        r = matched_ratio(a.realized, floor)
        points.append(
            setting_point(base, wl, "kvshare", f"match={g}", recompute_ratio=r, adaptive=False)
        )
    return points + anchors


class CurvePoint(NamedTuple):
    """After question ``item`` of a run on one engine: that question's reuse, relocated
    tokens recomputed after all (share), mean KL, and the anchor pool's bytes."""

    mode: str
    item: int
    reuse: float
    realized: float
    kl: float | None
    anchors_bytes: int


def learning_curve(base: Engine, wl: Workload, mode: str, shadow: bool = True) -> list[CurvePoint]:
    """Questions of ``wl`` in a row on one fresh engine in ``mode``, one point per question."""
    engine, out = recording(base, mode=mode), []
    for item in range(wl.n_items):
        recs = workload_records(engine, wl, f"{mode}-q", shadow, items=[item])
        p = point_of(mode, str(item), [r.stats for r in recs], [])
        out.append(CurvePoint(mode, item, p.reuse, p.realized, p.kl, engine.memory().anchors))
    return out


# ------------------------------------------------------------------ where the error sits


class KVError(NamedTuple):
    """The KV a call used against a full prefill of its prompt (the ``full`` oracle).

    error: [L, S] per layer and prompt token, (‖k − k_full‖ + ‖v − v_full‖) / (‖k_full‖ +
    ‖v_full‖) over heads and head dims: 0 where the call's KV is the oracle's.
    """

    mode: str
    record: CallRecord
    error: torch.Tensor


def kv_error(engine: Engine, record: CallRecord) -> torch.Tensor | None:
    """[L, S] relative KV error of ``record`` (a call ``engine`` served), or None when the
    engine keeps no KV of it (``full`` mode, or evicted from its radix prefix cache, which
    keeps every call's prompt and reply KV as the call used it)."""
    from kvshare.engine.fidelity import full_prefill
    from kvshare.kernels import splice
    from kvshare.model.prompt import render
    from kvshare.scope import scope_of

    s, cfg = record.stats, engine.config
    prompt = render(engine.tokenizer, list(record.messages), cfg.special_token_roles)
    ids, n = prompt.ids + record.tokens[:-1], len(prompt)
    scope = scope_of(cfg.share_scope, s.tenant, s.session)
    hit, parts = engine.prefix_cache.match(scope, ids)
    if hit < n or not parts:
        return None
    used = splice(parts)
    full, _ = full_prefill(engine.model, prompt.ids, engine.parts.empty())

    def norm(x: torch.Tensor) -> torch.Tensor:  # [L, H, S, D] -> [L, S]
        return x.float().transpose(1, 2).flatten(2).norm(dim=-1)

    dk, dv = norm(used.keys[:, :, :n] - full.keys), norm(used.values[:, :, :n] - full.values)
    return ((dk + dv) / (norm(full.keys) + norm(full.values)).clamp_min(1e-12)).cpu()


def kv_errors(
    base: Engine, wl: Workload, modes: Sequence[str], shadow: bool = True
) -> list[KVError]:
    """Every call of ``wl`` under every mode (fresh engine each) with its :func:`kv_error`."""
    out = []
    for mode in modes:
        engine = recording(base, mode=mode)
        for rec in workload_records(engine, wl, mode, shadow):
            err = kv_error(engine, rec)
            if err is not None:
                out.append(KVError(mode, rec, err))
    return out


def layer_profile(errors: Iterable[KVError]) -> dict[str, torch.Tensor]:
    """Per mode: [L] mean error over every prompt token of its calls."""
    sums: dict[str, list[torch.Tensor]] = {}
    for e in errors:
        sums.setdefault(e.mode, []).append(e.error)
    return {m: torch.cat(errs, 1).mean(1) for m, errs in sums.items()}


def run_start_profile(errors: Iterable[KVError], width: int = 32) -> dict[str, torch.Tensor]:
    """Per mode: [L, width] mean error at token offsets 0..width-1 from the start of every
    relocated run (``CallStats.relocated_runs``); NaN where no run is that long. Modes that
    relocate nothing are left out."""
    acc: dict[str, list[torch.Tensor]] = {}
    for e in errors:
        for start, end in e.record.stats.relocated_runs:
            cut = e.error[:, start : min(end, start + width)]
            pad = torch.full((cut.shape[0], width - cut.shape[1]), float("nan"))
            acc.setdefault(e.mode, []).append(torch.cat([cut, pad], 1))
    return {m: torch.stack(x).nanmean(0) for m, x in acc.items()}


def precision_points(
    wl: Workload,
    dtypes: Sequence[str] = ("float32", "bfloat16"),
    device: str = "cuda",
    mode: str = "kvshare",
    model: str | None = None,
) -> list[Point]:
    """One cold pass of ``wl`` in ``mode`` per dtype (the model loaded on ``device`` in it),
    fidelity against a full prefill in the same dtype (setting ``dtype=...``)."""
    out = []
    for dt in dtypes:
        base = Engine.from_pretrained(model, device=device, dtype=dt)
        out.append(setting_point(base, wl, mode, f"dtype={dt}"))
    return out
