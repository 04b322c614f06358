"""Idle-time teaching (``kvshare.engine.idle``): jobs from production calls are taught by
full prefills in the gaps between calls, and a call that arrives meanwhile waits at most
one layer of one."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from kvshare import Engine
from kvshare.engine.idle import IdleTeacher, Preempted, preemptible

from factories import team


def _workflow(engine: Engine, gap: float = 0.0) -> None:
    for role in ("planner", "critic", "judge", "critic"):
        engine.chat(team(role), agent=role, session="s", max_new_tokens=4)
        time.sleep(gap)


def test_idle_teaching_teaches_what_teach_true_teaches(tiny_engine):
    """With quiet gaps, every relocating call's job is taught: the pool ends as a
    ``teach=True`` run's (same anchors), while replies stay those of a production run."""
    idle = tiny_engine.fork(mode="kvshare", idle_teach=True, idle_quiet_s=0.0, adaptive=False)
    taught = tiny_engine.fork(mode="kvshare", adaptive=False)
    plain = tiny_engine.fork(mode="kvshare", adaptive=False)
    for role in ("planner", "critic", "judge", "critic"):
        msgs = team(role)
        a = idle.chat(msgs, agent=role, session="s", max_new_tokens=4)
        assert idle.teacher is not None and idle.teacher.drain(30)
        b = taught.chat(msgs, agent=role, session="s", max_new_tokens=4, teach=True)
        c = plain.chat(msgs, agent=role, session="s", max_new_tokens=4)
        assert a.tokens == c.tokens and a.stats.relocated_tokens == b.stats.relocated_tokens
    s = idle.teacher.stats()
    assert s.taught >= 1 and s.taught == s.offered and s.anchors > 0
    assert len(idle.anchor_pool()) == len(taught.anchor_pool()) > len(plain.anchor_pool())
    assert s.busy_s > 0 and s.delays == ()


def test_calls_back_to_back_never_start_a_teaching_prefill(tiny_engine):
    eng = tiny_engine.fork(mode="kvshare", idle_teach=True, idle_quiet_s=5.0)
    _workflow(eng)
    s = eng.teacher.stats()
    assert s.offered >= 1 and s.taught == 0 and s.busy_s == 0 and eng.teacher.pending() >= 1
    eng.reset()
    assert eng.teacher.pending() == 0 and eng.teacher.stats().offered == 0


def test_a_call_arriving_mid_prefill_preempts_it_within_one_layer(tiny_engine):
    """The worker holds the model in a slowed prefill (each layer sleeps 50 ms); a call
    arriving then waits for at most about one layer, and the job goes back to the queue."""
    eng = tiny_engine.fork(mode="kvshare", idle_teach=True, idle_quiet_s=0.0)
    teacher = eng.teacher
    eng.chat(team("planner"), agent="planner", session="s", max_new_tokens=4)
    slow = [layer.register_forward_pre_hook(lambda m, a: time.sleep(0.05))
            for layer in eng.adapter.layers]  # fmt: skip
    try:
        holding = threading.Event()
        threading.Thread(target=lambda: _await(teacher, holding), daemon=True).start()
        eng.chat(team("critic"), agent="critic", session="s", max_new_tokens=4)  # a job
        assert holding.wait(20), "the worker never started teaching"
        eng.chat(team("judge"), agent="judge", session="s", max_new_tokens=4)
    finally:
        for h in slow:
            h.remove()
    s = teacher.stats()
    assert s.preempted >= 1 and len(s.delays) >= 1
    assert max(s.delays) < 0.05 * 2 + 0.05  # one layer (+ the one it was in) and slack
    assert teacher.drain(30) and teacher.stats().taught >= 1


def _await(teacher: IdleTeacher, event: threading.Event) -> None:
    deadline = time.monotonic() + 20
    while not teacher.holding and time.monotonic() < deadline:
        time.sleep(0.001)
    event.set()


def test_preemptible_stops_between_layers_and_removes_its_hooks():
    layers = [torch.nn.Linear(2, 2) for _ in range(3)]
    calls = []
    with pytest.raises(Preempted), preemptible(layers, lambda: len(calls) >= 2) as starts:
        for layer in layers:
            layer(torch.zeros(1, 2))
            calls.append(1)
    assert len(starts) == 2 and all(not layer._forward_pre_hooks for layer in layers)


def test_idle_teaching_is_off_by_default_and_needs_an_anchored_mode(tiny_engine):
    assert tiny_engine.fork(mode="kvshare").teacher is None
    assert tiny_engine.fork(mode="blend", idle_teach=True).teacher is None
    assert tiny_engine.fork(mode="anchor", idle_teach=True).teacher is not None
