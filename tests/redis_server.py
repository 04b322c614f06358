"""A real ``redis-server`` on 127.0.0.1 (a free port, a temporary directory, no persistence
unless asked, ``maxmemory`` with an eviction policy) per test: ``RedisServer`` and the
``redis_server`` fixture (loaded by tests/conftest.py as a plugin). A server that cannot start
fails the test with the reason (``make redis-tools`` installs it)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from kvshare.serve.run import free_port

START_S = 10.0  # a server that does not answer PING by then fails the test
STOP_S = 10.0


class RedisServer:
    """One redis-server process; ``stop`` / ``start`` again on the same port and directory
    (a restart: with ``persist`` its RDB snapshot is reloaded, else it comes back empty)."""

    def __init__(
        self, maxmemory: str = "64mb", policy: str = "allkeys-lru", persist: bool = False
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: run `make redis-tools` (Debian package)")
        self.binary, self.port = binary, free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="kvshare-redis-"))
        self.args = [
            "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
            "--save", "3600 1" if persist else "", "--appendonly", "no",
            "--maxmemory", maxmemory, "--maxmemory-policy", policy,
            "--daemonize", "no", "--logfile", str(self.dir / "redis.log"),
        ]  # fmt: skip
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([self.binary, *self.args], stdout=subprocess.DEVNULL)
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1)
        deadline = time.monotonic() + START_S
        while True:
            try:
                if client.ping():
                    break
            except redis.RedisError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                self.stop()
                pytest.fail(f"redis-server did not start on port {self.port}: {log}")
            time.sleep(0.02)
        client.close()

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def stop(self) -> None:
        """Kill the server (SIGKILL: no shutdown save) and wait for it, bounded."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # a stopped (paused) process dies of SIGKILL too
            self.proc.wait(timeout=STOP_S)
        self.proc = None

    def pause(self, stopped: bool = True) -> None:
        """Freeze the server (SIGSTOP: it accepts connections but answers nothing, a stalled
        server) or thaw it (``stopped=False``: SIGCONT)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP if stopped else signal.SIGCONT)

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture()
def redis_server() -> Iterator[RedisServer]:
    """A started server (64 MB, allkeys-lru, no persistence), killed and removed after."""
    server = RedisServer()
    try:
        server.start()
        yield server
    finally:
        server.close()
