"""A change to the API keys file is seen without a restart, at a bounded cost per request."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from kvshare.serve import ServeConfig, auth
from kvshare.serve.auth import AuthError, KeyChecker, add_key

from serving import served


def remove(path, key: str) -> None:
    """Take ``key``'s entry out of the keys file (rewritten atomically, as add_key does)."""
    data = json.loads(path.read_text())
    data["keys"] = [e for e in data["keys"] if e["id"] != key.split("_")[1]]
    tmp = path.with_name("rewrite.tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def test_added_removed_and_corrupt_keys_files_are_seen_at_the_next_check(tmp_path):
    path = tmp_path / "keys.json"
    alice = add_key(path, "alice")
    checker = KeyChecker.of_file(path, check_s=0.0)
    assert checker.tenant(f"Bearer {alice}") == "alice"
    bob = add_key(path, "bob")
    assert checker.tenant(f"Bearer {bob}") == "bob"
    remove(path, alice)
    with pytest.raises(AuthError):  # remembered as seen, but removed: refused at once
        checker.tenant(f"Bearer {alice}")
    assert checker.known(f"Bearer {bob}") is None  # the cache was dropped with the old file
    path.write_text("{not json")
    assert checker.tenant(f"Bearer {bob}") == "bob"  # an unreadable file keeps the keys
    path.unlink()
    with pytest.raises(AuthError):  # no file: no keys
        checker.tenant(f"Bearer {bob}")


def test_the_file_is_stat_at_most_once_per_interval(tmp_path, monkeypatch):
    path = tmp_path / "keys.json"
    key = add_key(path, "alice")
    checker = KeyChecker.of_file(path, check_s=0.2)
    checker.tenant(f"Bearer {key}")
    stats = []
    real = auth._stamp
    monkeypatch.setattr(auth, "_stamp", lambda p: stats.append(p) or real(p))
    t0 = time.monotonic()
    while time.monotonic() - t0 < 0.5:
        assert checker.known(f"Bearer {key}") == "alice"
    assert 1 <= len(stats) <= 3  # thousands of checks, a stat per 0.2 s


def test_a_running_server_takes_a_new_key_and_drops_a_removed_one(tiny_engine, tmp_path):
    path = tmp_path / "keys.json"
    alice = add_key(path, "alice")
    config = ServeConfig(keys_file=str(path), keys_check_s=0.1)
    with served(tiny_engine.fork(), config) as server:

        def status(key: str) -> int:
            headers = {"Authorization": f"Bearer {key}"}
            return httpx.get(f"{server.base}/v1/models", headers=headers).status_code

        def settles(key: str, code: int) -> bool:
            deadline = time.monotonic() + 10
            while status(key) != code:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.05)
            return True

        assert status(alice) == 200
        bob = add_key(path, "bob")
        assert settles(bob, 200)
        remove(path, alice)
        assert settles(alice, 401) and status(bob) == 200
