"""``kvshare serve --replicas 2`` as a user runs it: a local Ray started, the endpoint
answering, and on SIGTERM the app, Ray and its temporary directory gone (exit 0)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from kvshare.serve.run import free_port


def test_serve_replicas_cli_starts_a_local_ray_serves_and_cleans_up(tiny_dirs):
    port = free_port()
    exe = str(Path(sys.executable).parent / "kvshare")
    cmd = [exe, "serve", "--replicas", "2", "--no-auth", "--model", str(tiny_dirs["llama"]),
           "--port", str(port), "--replica-cpus", "0.5"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until the app is ready (or the command died)
        found = re.search(r"on a local Ray in (\S+),", line)
        assert found, f"no start line (exit {proc.poll()}): {line!r}"
        temp = Path(found.group(1))
        assert temp.is_dir()
        body = {"model": tiny_dirs["llama"].name, "max_tokens": 2,
                "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.headers["x-kvshare-replica"]
        t0 = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
        assert time.monotonic() - t0 < 90 and not temp.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
