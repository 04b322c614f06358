"""The engine's public anchor persistence: per scope, verified, all-or-nothing."""

from __future__ import annotations

import random

import pytest
from kvshare.anchors import persist

from kvshare import Engine, EngineConfig
from kvshare.errors import ConfigError, ModelMismatchError, ScopeError, StateFileError

from factories import fingerprint, team


def _learn(eng, tenant: str | None = None) -> None:
    for role in ("planner", "critic", "judge"):
        eng.chat(team(role), tenant=tenant, agent=role, max_new_tokens=3, shadow=True, teach=True)


@pytest.fixture()
def learned(tiny_engine, tmp_path):
    eng = tiny_engine.fork(mode="kvshare")
    _learn(eng, tenant="A")
    path = tmp_path / "a.pool"
    eng.save_anchors(path, tenant="A")
    return eng, path


def test_saved_anchors_teach_another_engine_the_same(tiny_engine, learned):
    eng, path = learned
    assert len(eng.anchor_pool(tenant="A")) > 0 and len(eng.anchor_pool(tenant="B")) == 0
    fresh = tiny_engine.fork(mode="kvshare")
    fresh.load_anchors(path, tenant="B")
    assert fresh.anchor_pool(tenant="B").fingerprint()[:3] == eng.anchor_pool("A").fingerprint()[:3]
    assert len(fresh.anchor_pool(tenant="A")) == 0  # loaded into B's scope only


def test_corrupt_or_foreign_files_change_nothing(tiny_engine, tiny_dirs, learned, tmp_path):
    eng, path = learned
    before = fingerprint(eng)
    data = bytearray(path.read_bytes())
    rng = random.Random(0)
    for case in range(40):
        bad = bytearray(data)
        if case % 2:
            bad = bad[: rng.randrange(len(bad))]
        else:
            bad[rng.randrange(len(bad))] ^= 1 << rng.randrange(8)
        (tmp_path / "bad.pool").write_bytes(bytes(bad))
        with pytest.raises(StateFileError):
            eng.load_anchors(tmp_path / "bad.pool", tenant="A")
    state = persist.read_state(path)
    next(iter(state.keys.values())).deltas[0, 0, 0, 0, 0] = float("nan")
    persist.write_state(tmp_path / "nan.pool", state)
    with pytest.raises(StateFileError, match="NaN"):
        eng.load_anchors(tmp_path / "nan.pool", tenant="A")
    other = Engine.from_pretrained(str(tiny_dirs["qwen2"]), config=EngineConfig())
    with pytest.raises(ModelMismatchError):
        other.load_anchors(path)
    assert fingerprint(eng) == before


def test_anchor_api_refuses_what_it_cannot_do(tiny_engine, tmp_path):
    with pytest.raises(ConfigError, match="keeps no anchors"):
        tiny_engine.fork(mode="blend").save_anchors(tmp_path / "x.pool")
    with pytest.raises(ScopeError, match="session id"):
        tiny_engine.fork(mode="kvshare", share_scope="session").anchor_pool()
    with pytest.raises(ScopeError):
        tiny_engine.fork(mode="kvshare").anchor_pool(tenant=3)  # type: ignore[arg-type]
