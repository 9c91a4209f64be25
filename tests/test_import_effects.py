"""Importing the product changes no global state; the loopback gRPC rebind happens only when asked.

Each check runs in a fresh interpreter (a subprocess), so that modules imported by earlier tests
cannot hide an effect: it records Ray Serve's gRPC port helper, the root logger's handlers and
level, torch's global RNG state and ``os.environ``, imports every module of the product packages
(``expertmap.actors``, ``expertmap.predictor``, ``expertmap.cluster``, ``expertmap.models``; the
bench is not product), and compares.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.timeout(600)

PRODUCT = ("expertmap.actors", "expertmap.predictor", "expertmap.cluster", "expertmap.models")

_IMPORT_ALL = textwrap.dedent(
    """
    import importlib, json, logging, os, pkgutil, sys

    env = dict(os.environ)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    import torch
    rng = torch.random.get_rng_state().clone()
    from ray.serve._private import replica
    grpc_helper = replica.add_port_to_grpc_server
    env_after_deps = dict(os.environ)  # what torch and Ray themselves do at import is theirs

    imported, failed = [], {}
    for pkg_name in PACKAGES:
        pkg = importlib.import_module(pkg_name)
        imported.append(pkg_name)
        for info in pkgutil.walk_packages(pkg.__path__, prefix=pkg_name + "."):
            try:
                importlib.import_module(info.name)
                imported.append(info.name)
            except Exception as exc:
                failed[info.name] = f"{type(exc).__name__}: {exc}"

    changed_env = sorted(k for k in set(env_after_deps) | set(os.environ) if env_after_deps.get(k) != os.environ.get(k))
    print(json.dumps({
        "imported": imported,
        "failed": failed,
        "deps_env": sorted(k for k in set(env) | set(env_after_deps) if env.get(k) != env_after_deps.get(k)),
        "env": changed_env,
        "grpc_helper_same": replica.add_port_to_grpc_server is grpc_helper,
        "root_handlers_same": root.handlers == handlers,
        "root_handlers": [repr(h) for h in root.handlers],
        "root_level": [level, root.level],
        "rng_same": bool(torch.equal(torch.random.get_rng_state(), rng)),
        "bench_imported": sorted(m for m in sys.modules if m == "expertmap.bench" or m.startswith("expertmap.bench.")),
    }))
    """
)


def _run(code: str, env: dict | None = None) -> dict:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=500,
                       env={**os.environ, **(env or {})})  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("local_only", ["0", None], ids=["local-only", "env-unset"])
def test_importing_every_product_module_changes_no_global_state(local_only):
    env = dict(os.environ)
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    if local_only is not None:
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = local_only
    r = subprocess.run([sys.executable, "-c", f"PACKAGES = {PRODUCT!r}\n" + _IMPORT_ALL], capture_output=True,
                       text=True, timeout=500, env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    found = json.loads(r.stdout.strip().splitlines()[-1])
    assert not found["failed"], found["failed"]
    # the walk really reached the modules that used to have effects
    for name in ("expertmap.cluster.serve_app", "expertmap.cluster.stage_actor", "expertmap.cluster.map_service_actor",
                 "expertmap.cluster.cli", "expertmap.actors.engine"):  # fmt: skip
        assert name in found["imported"], name
    assert found["grpc_helper_same"], "an import rebound ray.serve._private.replica.add_port_to_grpc_server"
    assert found["root_handlers_same"], f"an import added root logging handlers: {found['root_handlers']}"
    assert found["root_level"][0] == found["root_level"][1], f"an import changed the root level: {found['root_level']}"
    assert found["rng_same"], "an import changed torch's global RNG state"
    assert not found["env"], f"an import changed os.environ: {found['env']}"
    assert not found["bench_imported"], f"the product imported the bench: {found['bench_imported']}"


def test_loopback_grpc_rebind_is_explicit_and_idempotent():
    code = textwrap.dedent(
        """
        import json
        from ray.serve._private import replica
        original = replica.add_port_to_grpc_server
        from expertmap.cluster.local_grpc import bind_replica_grpc_to_loopback

        untouched = replica.add_port_to_grpc_server is original
        first = bind_replica_grpc_to_loopback()
        helper = replica.add_port_to_grpc_server
        second = bind_replica_grpc_to_loopback()

        class Server:  # records the address a gRPC server would be bound to
            def __init__(self):
                self.bound = []
            def add_insecure_port(self, address):
                self.bound.append(address)
                return 1234

        s = Server()
        ports = [helper(s, "[::]:0"), helper(s, "10.1.2.3:5000")]
        print(json.dumps({"untouched": untouched, "first": first, "second": second, "changed": helper is not original,
                          "same_after_second": replica.add_port_to_grpc_server is helper, "bound": s.bound,
                          "ports": ports}))
        """
    )
    found = _run(code, {"RAY_USE_TLS": "0"})
    assert found["untouched"], "importing expertmap.cluster.local_grpc rebound the helper"
    assert found["first"] and found["second"] and found["changed"] and found["same_after_second"]
    assert found["bound"] == ["127.0.0.1:0", "10.1.2.3:5000"], found["bound"]
    assert found["ports"] == [1234, 1234]


def test_the_serve_app_does_not_import_the_cli():
    """No import circle: the CLI imports the app's arguments, never the other way round."""
    found = _run("import json, sys\nimport expertmap.cluster.serve_app\n"
                 "print(json.dumps({'cli': 'expertmap.cluster.cli' in sys.modules}))")  # fmt: skip
    assert not found["cli"]
