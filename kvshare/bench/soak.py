"""Memory soak: RSS and stored bytes over many calls (``python -m kvshare.bench.soak``).

Checks the issue-9 target "RSS flat over 1,000 calls with ``session=None``": every call has
a different user turn (so nothing is a pure repeat) behind one shared system prompt.
"""

from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path

from tqdm.auto import tqdm

from kvshare.config import EngineConfig
from kvshare.engine.engine import Engine


def rss_mib() -> float:
    """Resident set size now, from /proc (peak RSS from getrusage where /proc is absent)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def soak(engine: Engine, calls: int, every: int = 100) -> list[tuple[int, float, int]]:
    """(calls done, RSS MiB, bytes stored) every ``every`` calls."""
    system = {"role": "system", "content": "You answer in one word. " * 20}
    samples = []
    for i in tqdm(range(1, calls + 1), desc=f"soak {engine.config.share_scope}", leave=False):
        user = {"role": "user", "content": f"Question {i}: what is {i} plus {i}?"}
        engine.chat([system, user], max_new_tokens=2)
        if i % every == 0:
            samples.append((i, rss_mib(), engine.memory().total))
    return samples


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--scope", default="session", choices=["session", "tenant", "global"])
    ap.add_argument("--mode", default="kvshare")
    args = ap.parse_args(argv)
    config = EngineConfig(mode=args.mode, share_scope=args.scope)
    engine = Engine.from_pretrained(config=config)
    for done, rss, stored in soak(engine, args.calls):
        print(f"{done:5d} calls  RSS {rss:8.1f} MiB  stored {stored / 2**20:8.2f} MiB")
    print(f"ledger: {len(engine.calls)} kept, {engine.stats().calls} counted", file=sys.stderr)


if __name__ == "__main__":
    main()
