"""A local-only Ray with declared GPUs and Serve apps on a free loopback port, for the HTTP tests."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray is imported (docs/cluster-and-deployment.md)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_on_loopback(apps: dict[str, tuple[str, dict]], gpus: int) -> Iterator[str]:
    """Start Ray (2 CPUs, ``gpus`` declared GPUs) and ``apps`` ({name: (route prefix, builder args)});
    yield the base URL; shut Serve and Ray down afterwards."""
    import ray
    from ray import serve

    from expertmap.cluster.serve_app import build_app

    port = free_port()
    ray.init(num_cpus=2, num_gpus=gpus, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for name, (prefix, args) in apps.items():
            serve.run(build_app(args), name=name, route_prefix=prefix)
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
