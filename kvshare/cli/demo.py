"""``kvshare demo``: a multi-agent workflow under ``full`` and the best mode, per agent."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from kvshare.cli.common import TEAMS, add_model_args, engine_for


def add_parser(sub: Any) -> None:
    """Register ``kvshare demo`` on the subparsers ``sub``."""
    demo = sub.add_parser("demo", help="multi-agent workflow: full vs best mode, per agent")
    add_model_args(demo)
    demo.add_argument("--max-new-tokens", type=int, default=48)
    demo.add_argument(
        "--workflow",
        choices=TEAMS,
        default=None,
        help="run a reference team (a LangGraph graph on ChatKVShare) under full and kvshare "
        "instead of the QA demo: rag (NarrativeQA), debate (GSM-style math), code (HumanEval)",
    )
    demo.add_argument("--items", type=int, default=None, help="--workflow: items to run")
    demo.add_argument(
        "--server",
        default=None,
        help="--workflow: run the team through ChatOpenAI against this `kvshare serve` "
        "(http://host:port) instead of in process; key: $KVSHARE_API_KEY",
    )
    demo.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvshare.demo import run_demo, run_team_demo

    if args.server:
        return run_remote(args)
    if args.workflow:
        run_team_demo(engine_for(args), args.workflow, items=args.items, out=sys.stdout)
        return 0
    run_demo(engine_for(args), max_new_tokens=args.max_new_tokens, out=sys.stdout)
    return 0


def run_remote(args: argparse.Namespace) -> int:
    """``--workflow NAME --server URL``: the team's score, answers and the server's reuse."""
    import os

    from kvshare.errors import ConfigError
    from kvshare.serve.remote import run_team_remote

    if not args.workflow:
        raise ConfigError("--server needs --workflow NAME (a reference team)")
    key = os.environ.get("KVSHARE_API_KEY", "unused")
    run = run_team_remote(args.server.rstrip("/"), args.workflow, args.items, key)
    score = 100 * sum(run.scores) / max(1, len(run.scores))
    print(f"{args.workflow} via {args.server}: {len(run.scores)} item(s), score {score:.1f}, "
          f"token reuse {100 * run.reuse:.1f}% ({run.reused:.0f} of "
          f"{run.reused + run.computed:.0f} prompt tokens)")  # fmt: skip
    for answer in run.answers:
        print(f"- {answer[:300]}")
    return 0
