"""A restarted ``kvshare serve`` adopts its disk tier: SIGTERM moves the trace store's
segments to disk (exit 0), and a new process over the same directory reuses them."""

from __future__ import annotations

from pathlib import Path

import httpx

from serving import spawned, terminate

PROMPT = [
    {"role": "system", "content": "You answer questions about the shipping ledger. " * 6},
    {"role": "user", "content": "Which crate left the dock on the third day, and why?"},
]


def ask(base: str) -> tuple[str, int]:
    """(reply, usage.prompt_tokens_details.cached_tokens) of PROMPT, greedy."""
    model = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
    body = {"model": model, "messages": PROMPT, "max_tokens": 8, "temperature": 0}
    r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    return out["choices"][0]["message"]["content"], out["usage"]["prompt_tokens_details"][
        "cached_tokens"
    ]


def test_a_restarted_server_reuses_the_kv_its_predecessor_persisted_on_sigterm(tmp_path: Path):
    disk = tmp_path / "disk"
    config = tmp_path / "serve.toml"
    config.write_text(f'[engine]\nmode = "kvshare"\ndisk_tier_dir = "{disk}"\n')
    args = ["--model", "random:tiny-deep", "--config", str(config)]
    with spawned(args) as (base, proc):
        first, cached = ask(base)
        assert cached == 0  # nothing stored yet
        files = [p for p in disk.rglob("*") if p.is_file()]  # the key file, no segment
        assert terminate(proc) == 0
    persisted = [p for p in disk.rglob("*") if p.is_file() and p not in files]
    assert persisted, "SIGTERM wrote nothing to the disk tier"
    with spawned(args) as (base, proc):
        again, cached = ask(base)
        assert terminate(proc) == 0
    assert cached > 0 and again == first
