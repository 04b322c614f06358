"""Ray for ``kvshare serve --replicas``: a local instance or an existing cluster, and the
Serve application on it.

:func:`ray_session` joins the cluster at ``address`` (checked first with a plain TCP connect,
so a wrong address fails in seconds, not after Ray's minutes of retries) or starts a local
Ray on 127.0.0.1 with a temporary directory, removed with everything in it when the session
ends. :func:`deploy` starts Serve's HTTP proxy on ``host:port`` and runs the application;
:func:`undeploy` removes it (and, on a local Ray, Serve). Every failure is a
:class:`~kvshare.errors.RayStartError` carrying Ray's reason. Imports Ray.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ray
from ray import serve

from kvshare.errors import RayStartError
from kvshare.serve.ray_app import ReplicaSpec, build_app

APP = "kvshare"
OBJECT_STORE_BYTES = 256 << 20  # a local Ray's object store: requests and answers are small


def check_reachable(address: str, timeout_s: float = 3.0) -> None:
    """RayStartError unless something accepts TCP connections at ``host:port``."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise RayStartError(f"--address wants HOST:PORT of a Ray head (ray start --head), got "
                            f"{address!r}")  # fmt: skip
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise RayStartError(f"no Ray head answers at {address}: {exc}") from exc


@contextmanager
def ray_session(address: str | None, cpus: int) -> Iterator[str | None]:
    """Connected to Ray for the block; yields the temporary directory of a local Ray (None
    when joining ``address``). ``cpus``: the local Ray's CPU count."""
    temp = None if address else tempfile.mkdtemp(prefix="kvshare-ray-")
    try:
        if address:
            check_reachable(address)
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(
                address="local", num_cpus=cpus, _temp_dir=temp, _node_ip_address="127.0.0.1",
                include_dashboard=False, object_store_memory=OBJECT_STORE_BYTES,
                log_to_driver=False,
            )  # fmt: skip
    except RayStartError:
        raise
    except Exception as exc:  # Ray raises several kinds; the caller needs its reason
        where = address or f"a local instance in {temp}"
        raise RayStartError(f"Ray could not start or connect ({where}): {exc}") from exc
    try:
        yield temp
    finally:
        ray.shutdown()
        if temp:
            shutil.rmtree(temp, ignore_errors=True)


def deploy(spec: ReplicaSpec, replicas: int, host: str, port: int, name: str = APP) -> Any:
    """Serve's proxy on ``host:port`` and the application ``name`` (at ``/``) ready; its
    ingress handle. On a cluster where Serve runs already its proxy options stay."""
    try:
        serve.start(http_options={"host": host, "port": port})
        return serve.run(build_app(spec, replicas), name=name, route_prefix="/")
    except Exception as exc:
        why = f"Ray Serve could not deploy {replicas} replica(s): {exc}{deployment_errors(name)}"
        raise RayStartError(why) from exc


def deployment_errors(name: str) -> str:
    """What Serve says of the application's unhealthy deployments ('' when nothing)."""
    try:
        app = serve.status().applications.get(name)
    except Exception:  # Serve itself is down: the caller's message says so
        return ""
    if app is None:
        return ""
    said = [f"{d}: {s.message}" for d, s in app.deployments.items() if s.message]
    return "".join(f"\n  {line}" for line in said)


def undeploy(local: bool, name: str = APP) -> None:
    """Remove the application ``name``; on a local Ray stop Serve too."""
    if local:
        serve.shutdown()
    else:
        serve.delete(name)
