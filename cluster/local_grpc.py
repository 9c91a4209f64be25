"""Keep a local-only Serve replica's inter-deployment gRPC server on loopback.

Ray Serve 2.60 opens one gRPC server per replica, for calls between deployments, on ``[::]:0``
(every interface) and has no setting for the address. On a Ray node whose address is loopback
(``expertmap serve`` without ``--address``, the tests: ``ray.init(_node_ip_address="127.0.0.1")``)
nothing beyond this machine can be part of the cluster, so that port need not be reachable from
elsewhere either; ``bind_replica_grpc_to_loopback`` makes it listen on 127.0.0.1 only.

Nothing here runs at import. The rebind is applied explicitly, by the one process that needs it:
the replica's worker process, from ``ExpertMapServer.__init__`` (see the function's docstring).
"""

from __future__ import annotations

import ipaddress
import logging

logger = logging.getLogger(__name__)

_MARK = "_expertmap_loopback"


def node_is_loopback() -> bool:
    """Whether this process's Ray node has a loopback address (a local-only cluster). Needs Ray
    connected (a driver after ``ray.init``, or any worker process)."""
    import ray

    address = ray.util.get_node_ip_address()
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:  # a host name: not one we can vouch for
        return address == "localhost"


def bind_replica_grpc_to_loopback() -> bool:
    """Rebind Ray Serve's gRPC port helper in THIS process so that a replica's inter-deployment
    gRPC server binds ``127.0.0.1:0`` instead of ``[::]:0``; other addresses pass unchanged.

    Which process needs it, and when: a replica runs in its own Ray worker process. Serve
    unpickles the deployment class there, calls its constructor and then, in
    ``Replica._on_initialized``, opens the server with
    ``ray.serve._private.replica.add_port_to_grpc_server(server, "[::]:0")``; the helper is looked
    up as a module attribute at that moment. So the deployment's constructor is the place to
    call this (``ExpertMapServer.__init__`` does, when ``node_is_loopback()``). Calling it in a
    driver such as ``expertmap serve`` would change nothing that matters: no replica runs there.

    It replaces the module attribute ``ray.serve._private.replica.add_port_to_grpc_server`` with a
    wrapper (process-wide, kept until the process exits) and is idempotent. Returns True when the
    helper is rebound after the call, False when this Ray has no such helper (another layout:
    left alone, with a warning).
    """
    try:
        from ray.serve._private import replica as _replica
    except ImportError:  # pragma: no cover - another Ray layout
        logger.warning("ray.serve._private.replica not found; the replica's gRPC server keeps Ray's address")
        return False
    original = getattr(_replica, "add_port_to_grpc_server", None)
    if original is None:  # pragma: no cover - another Ray layout
        logger.warning("this Ray has no replica gRPC port helper; the replica's gRPC server keeps Ray's address")
        return False
    if getattr(original, _MARK, False):
        return True

    def add_port(server, address):
        return original(server, "127.0.0.1:0" if address == "[::]:0" else address)

    setattr(add_port, _MARK, True)
    add_port.__wrapped__ = original
    _replica.add_port_to_grpc_server = add_port
    logger.debug("replica gRPC server bound to 127.0.0.1 (local-only node)")
    return True
