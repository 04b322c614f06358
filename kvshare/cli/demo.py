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
    demo.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvshare.demo import run_demo, run_team_demo

    if args.workflow:
        run_team_demo(engine_for(args), args.workflow, items=args.items, out=sys.stdout)
        return 0
    run_demo(engine_for(args), max_new_tokens=args.max_new_tokens, out=sys.stdout)
    return 0
