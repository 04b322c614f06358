"""A real ``redis-server`` per test (``kvshare.bench.local_redis.LocalRedis``: 127.0.0.1, a free
port, a temporary directory, no persistence, 64 MB ``maxmemory`` with allkeys-lru): the
``redis_server`` fixture (loaded by tests/conftest.py as a plugin). A server that cannot start
fails the test with the reason (``make redis-tools`` installs it)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvshare.bench.local_redis import LocalRedis
from kvshare.errors import ServiceUnavailableError


@pytest.fixture()
def redis_server() -> Iterator[LocalRedis]:
    """A started server, killed and its directory removed after the test."""
    try:
        server = LocalRedis()
        server.start()
    except ServiceUnavailableError as exc:
        pytest.fail(str(exc))
    try:
        yield server
    finally:
        server.close()
