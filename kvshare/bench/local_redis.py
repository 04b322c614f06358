"""A real ``redis-server`` on 127.0.0.1 for benches and tests: a free port, a temporary
directory, no persistence unless asked, ``maxmemory`` with an eviction policy. ``make
redis-tools`` installs the server (Debian's ``redis-server``); one that is missing or does not
answer PING in time raises :class:`~kvshare.errors.ServiceUnavailableError` with the reason."""

from __future__ import annotations

import ctypes
import shutil
import signal
import subprocess
import tempfile
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

from kvshare.errors import ServiceUnavailableError
from kvshare.serve.run import free_port

START_S = 10.0  # a server that does not answer PING by then did not start
STOP_S = 10.0


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the parent dies (Linux ``PR_SET_PDEATHSIG``),
    so a killed bench or test run leaves no server behind; a no-op elsewhere."""
    with suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


class LocalRedis:
    """One redis-server process on a free loopback port; ``stop`` then ``start`` again on the
    same port and directory is a restart (with ``persist`` its RDB snapshot is reloaded, else
    it comes back empty)."""

    def __init__(
        self, maxmemory: str = "64mb", policy: str = "allkeys-lru", persist: bool = False
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServiceUnavailableError(
                "redis-server is not installed: run `make redis-tools` (Debian's redis-server)"
            )
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
        """Start the server and wait (bounded) until it answers PING."""
        import redis

        self.proc = subprocess.Popen(
            [self.binary, *self.args], stdout=subprocess.DEVNULL, preexec_fn=_die_with_parent
        )
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1)
        deadline = time.monotonic() + START_S
        try:
            while not self._pong(client, redis.RedisError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                    self.stop()
                    raise ServiceUnavailableError(
                        f"redis-server did not start on 127.0.0.1:{self.port}: {log}"
                    )
                time.sleep(0.02)
        finally:
            client.close()

    @staticmethod
    def _pong(client: Any, errors: type[Exception]) -> bool:
        try:
            return bool(client.ping())
        except errors:
            return False

    def client(self) -> Any:
        """A plain redis-py client of this server (5 s timeouts)."""
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def stop(self) -> None:
        """Kill the server (SIGKILL: no shutdown save; a paused one too), wait, bounded."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=STOP_S)
        self.proc = None

    def pause(self, stopped: bool = True) -> None:
        """Freeze the server (SIGSTOP: connections open but nothing answers, a stalled
        server) or thaw it (``stopped=False``: SIGCONT)."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGSTOP if stopped else signal.SIGCONT)

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and delete its directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
