"""Command line: ``kvshare demo``, ``kvshare bench``, ``kvshare chat``, ``kvshare serve`` (one
module each).

Wing: the top. May import every other wing; nothing imports it.
"""

from __future__ import annotations

import argparse
import sys

from kvshare.cli import bench, chat, demo, serve
from kvshare.errors import KVShareError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvshare", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (demo, bench, chat, serve):
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KVShareError as exc:
        print(f"kvshare: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
