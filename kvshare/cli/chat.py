"""``kvshare chat``: one chat call, its text on stdout and its timings on stderr."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from kvshare.cli.common import add_model_args, engine_for
from kvshare.config import IMPLEMENTED_MODES


def add_parser(sub: Any) -> None:
    """Register ``kvshare chat`` on the subparsers ``sub``."""
    chat = sub.add_parser("chat", help="one chat call")
    add_model_args(chat)
    chat.add_argument("prompt")
    chat.add_argument("--system", default=None)
    chat.add_argument("--mode", default="kvshare", choices=IMPLEMENTED_MODES)
    chat.add_argument("--max-new-tokens", type=int, default=128)
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    engine = engine_for(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": args.prompt})
    r = engine.chat(messages, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    print(r.text)
    s = r.stats
    print(
        f"[{s.prompt_tokens} prompt tokens, TTFT {s.ttft_s * 1000:.0f} ms, "
        f"{s.decode_tok_s:.1f} tok/s]",
        file=sys.stderr,
    )
    return 0
