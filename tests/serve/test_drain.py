"""``kvshare serve`` as a process: SIGTERM lets the stream in flight finish, then exits 0."""

from __future__ import annotations

import json
import threading

import httpx

from serving import spawned, terminate


def test_sigterm_drains_the_stream_in_flight_and_exits_zero(tmp_path):
    """80 tokens and a 150 s drain: on this 2-core machine under other work a tiny-deep step
    took up to 0.4 s, and 200 tokens outlasted the default 30 s drain (the stream was cut,
    correctly, at the limit)."""
    config = tmp_path / "drain.toml"
    config.write_text("[serve]\ndrain_s = 150\n")
    args = ["--model", "random:tiny-deep", "--mode", "prefix", "--config", str(config)]
    with spawned(args) as (base, proc):
        model = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
        body = {"model": model, "messages": [{"role": "user", "content": "Tell a story."}],
                "max_tokens": 80, "stream": True, "temperature": 0}  # fmt: skip
        lines: list[str] = []
        first = threading.Event()

        def read() -> None:
            with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=180) as r:
                for line in r.iter_lines():
                    lines.append(line)
                    first.set()

        reader = threading.Thread(target=read)
        reader.start()
        assert first.wait(60)
        at_signal = len(lines)
        assert terminate(proc, timeout=180) == 0
        reader.join(timeout=60)
    events = [line[6:] for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(lines) > at_signal + 2  # it went on after SIGTERM
    finish = json.loads(events[-2])["choices"][0]["finish_reason"]
    assert finish in ("length", "stop")
