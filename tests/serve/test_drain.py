"""``kvshare serve`` as a process: SIGTERM lets the stream in flight finish, then exits 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from kvshare.serve.run import free_port

KVSHARE = Path(sys.executable).parent / "kvshare"


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
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


def test_sigterm_drains_the_stream_in_flight_and_exits_zero():
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [str(KVSHARE), "serve", "--no-auth", "--port", str(port), "--model", "random:tiny-deep",
         "--mode", "prefix"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_ready(base, proc)
        model = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
        body = {"model": model, "messages": [{"role": "user", "content": "Tell a story."}],
                "max_tokens": 200, "stream": True, "temperature": 0}  # fmt: skip
        lines: list[str] = []
        first = threading.Event()

        def read() -> None:
            with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    lines.append(line)
                    first.set()

        reader = threading.Thread(target=read)
        reader.start()
        assert first.wait(60)
        at_signal = len(lines)
        os.kill(proc.pid, signal.SIGTERM)
        reader.join(timeout=60)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    events = [line[6:] for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(lines) > at_signal + 2  # it went on after SIGTERM
    finish = json.loads(events[-2])["choices"][0]["finish_reason"]
    assert finish in ("length", "stop")
