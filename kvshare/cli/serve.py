"""``kvshare serve``: the OpenAI-compatible server (``kvshare.serve``), and
``kvshare serve keys add NAME``: a new API key for tenant NAME, printed once."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from kvshare.cli.common import add_model_args
from kvshare.config import IMPLEMENTED_MODES
from kvshare.errors import ConfigError


def default_keys() -> str:
    from kvshare.model.cache import kvshare_home

    return str(kvshare_home() / "serve-keys.json")


def add_parser(sub: Any) -> None:
    """Register ``kvshare serve`` (and ``serve keys add``) on the subparsers ``sub``."""
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (tenants from API keys)")
    add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--mode", default=None, choices=IMPLEMENTED_MODES)
    serve.add_argument("--config", default=None, help="TOML/JSON: [serve] and [engine] tables")
    serve.add_argument("--keys", default=None, help="API keys file (kvshare serve keys add)")
    serve.add_argument(
        "--no-auth", action="store_true", help="no keys, one tenant (loopback hosts only)"
    )
    serve.add_argument("--log-level", default="warning")
    add_replica_args(serve)
    serve.set_defaults(func=run)
    actions = serve.add_subparsers(dest="action")
    keys = actions.add_parser("keys", help="manage API keys").add_subparsers(
        dest="keys_action", required=True
    )
    add = keys.add_parser("add", help="add a key for tenant NAME and print it (once)")
    add.add_argument("name")
    add.add_argument("--keys", default=None, help=f"keys file (default {default_keys()})")
    add.set_defaults(func=run_add)


def add_replica_args(serve: Any) -> None:
    """``--replicas N`` and its options: the app on Ray Serve (``kvshare.serve.ray_app``)."""
    serve.add_argument(
        "--replicas", type=int, default=None, help="N engines as Ray Serve replicas (ray[serve])"
    )
    serve.add_argument(
        "--address", default=None, help="--replicas: join the Ray cluster at HOST:PORT "
        "(default: start a local Ray on 127.0.0.1, stopped on exit)",
    )  # fmt: skip
    serve.add_argument(
        "--router", default="affinity", choices=["affinity", "default"],
        help="--replicas: cache-affinity router, or Ray's default (power of two)",
    )  # fmt: skip
    serve.add_argument(
        "--threshold", type=int, default=4, help="--replicas: load gap (requests) past which "
        "a workflow leaves its replica",
    )  # fmt: skip
    serve.add_argument("--replica-cpus", type=float, default=1.0, help="--replicas: CPUs each")
    serve.add_argument("--replica-gpus", type=float, default=0.0, help="--replicas: GPUs each")


def run_add(args: argparse.Namespace) -> int:
    from kvshare.serve.auth import add_key

    path = args.keys or default_keys()
    key = add_key(path, args.name)
    print(key)
    print(f"added a key for tenant {args.name!r} to {path}; it is not shown again", file=sys.stderr)
    return 0


def server_configs(args: argparse.Namespace) -> tuple[Any, Any]:
    """(ServeConfig, EngineConfig) from ``--config``, ``--keys``, ``--no-auth``, ``--mode``."""
    from kvshare.serve.config import read_config, serve_config, server_engine_config

    serve, engine = read_config(args.config) if args.config else (None, server_engine_config())
    keys = args.keys or (serve.keys_file if serve else None)
    if keys is None and not args.no_auth:
        raise ConfigError("give --keys FILE (kvshare serve keys add NAME) or --no-auth")
    if keys is not None and args.no_auth:
        raise ConfigError("--no-auth and a keys file exclude each other")
    serve = serve_config(serve, keys_file=keys)
    return serve, engine.with_options(mode=args.mode) if args.mode else engine


def run(args: argparse.Namespace) -> int:
    from kvshare.engine.engine import Engine
    from kvshare.serve.run import check_bind, make_server

    serve, engine_config = server_configs(args)
    check_bind(args.host, serve)  # before the model loads
    if args.replicas is not None:
        from kvshare.cli.serve_ray import run_replicas

        return run_replicas(args, serve, engine_config)
    engine = Engine.from_pretrained(
        args.model, device=args.device, dtype=args.dtype, config=engine_config
    )
    server = make_server(engine, serve, args.host, args.port, log_level=args.log_level)
    print(f"kvshare serve: http://{args.host}:{args.port}/v1 ({engine.config.mode})", flush=True)
    server.run()
    return 0
