"""``kvshare serve --replicas N``: the server as a Ray Serve application until a signal."""

from __future__ import annotations

import argparse
import math
import os
import signal
import threading
from typing import Any


def replica_spec(args: argparse.Namespace, serve: Any, engine: Any) -> Any:
    """The :class:`~kvshare.serve.ray_app.ReplicaSpec` of the command line (keys parsed)."""
    from kvshare.serve.auth import read_keys
    from kvshare.serve.ray_app import ReplicaSpec

    keys = read_keys(serve.keys_file) if serve.keys_file else None
    return ReplicaSpec(
        model=args.model, device=args.device, dtype=args.dtype, engine=engine, serve=serve,
        keys=keys, router=args.router, threshold=args.threshold, cpus=args.replica_cpus,
        gpus=args.replica_gpus,
    )  # fmt: skip


def wait_for_signal() -> None:
    """Block until SIGINT or SIGTERM."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass


def run_replicas(args: argparse.Namespace, serve: Any, engine: Any) -> int:
    from kvshare.errors import ConfigError
    from kvshare.serve.ray_cluster import deploy, ray_session, undeploy

    if args.replicas < 1:
        raise ConfigError(f"--replicas must be >= 1, got {args.replicas}")
    spec = replica_spec(args, serve, engine)
    cpus = max(os.cpu_count() or 1, math.ceil(args.replicas * args.replica_cpus))
    with ray_session(args.address, cpus) as temp:
        deploy(spec, args.replicas, args.host, args.port)
        where = args.address or f"a local Ray in {temp}"
        print(
            f"kvshare serve: http://{args.host}:{args.port}/v1 ({args.replicas} replicas on "
            f"{where}, {args.router} router)", flush=True,
        )  # fmt: skip
        try:
            wait_for_signal()
        finally:
            undeploy(local=args.address is None)
    return 0
