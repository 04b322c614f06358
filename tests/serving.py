"""A real uvicorn server on 127.0.0.1 (a free port) in a thread, per test module: ``served``
and the fixtures of tests/serve (loaded by tests/conftest.py as a plugin); ``spawned``: a real
``kvshare serve`` process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from kvshare import Engine
from kvshare.serve import ServeConfig
from kvshare.serve.run import free_port, make_server

START_S = 20.0  # a server that does not answer /health by then fails the test
KVSHARE = Path(sys.executable).parent / "kvshare"


@contextmanager
def served(engine: Any, config: ServeConfig | None = None) -> Iterator[Any]:
    """Run ``engine`` behind a server on a free loopback port; yields the server (its
    ``base`` URL and app ``state``); stops it (bounded) on exit."""
    port = free_port()
    server = make_server(engine, config or ServeConfig(), "127.0.0.1", port)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    server.base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_S
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield server
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        assert not thread.is_alive(), "the test server did not stop"


@pytest.fixture(scope="module")
def tiny_server(tiny_engine: Engine) -> Iterator[Any]:
    """A no-auth server over a fork of the tiny random engine (prefix mode, empty stores)."""
    with served(tiny_engine.fork()) as server:
        yield server


@pytest.fixture()
def client(tiny_server: Any) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=tiny_server.base, timeout=60) as c:
        yield c


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Until ``GET /ready`` answers 200; AssertionError (with the server's stderr) when the
    process exits first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        try:
            if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("the server never became ready")


@contextmanager
def spawned(args: Sequence[str]) -> Iterator[tuple[str, subprocess.Popen]]:
    """``kvshare serve --no-auth --port P *args`` as a process, ready; yields (base URL,
    process). Killed on exit if still running (a test that expects an exit waits for it)."""
    port = free_port()
    cmd = [str(KVSHARE), "serve", "--no-auth", "--port", str(port), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, proc)
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def terminate(proc: subprocess.Popen, timeout: float = 60.0) -> int:
    """SIGTERM ``proc`` and wait for its exit status."""
    os.kill(proc.pid, signal.SIGTERM)
    return proc.wait(timeout=timeout)
