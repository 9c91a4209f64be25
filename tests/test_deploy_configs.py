"""The deployment configs validate offline, with the validators their tools use, and broken copies fail.

- configs/cluster/*.yaml: Ray's own cluster-config check, ``validate_config(prepare_config(cfg))``
  (the JSON schema ray/autoscaler/ray-schema.json plus Ray's cross-field rules and the local
  provider's preparation). `ray up`'s provider bootstrap (AWS credentials, IAM, subnets, AMIs)
  needs the cloud and is not run.
- configs/serve*.yaml and the RayService's serveConfigV2: ``ray.serve.schema.ServeDeploySchema``,
  plus the unknown-key check that schema leaves out (it accepts extra keys for forward
  compatibility) and a check of the builder's args.
- k8s/rayservice.yaml: the RayService CRD's openAPIV3Schema (tests/data/kuberay/, with its license), with
  unknown fields rejected as `kubectl apply --validate=strict` does, and the list-map keys
  (`x-kubernetes-list-map-keys`) unique. The CRD's three CEL rules (`x-kubernetes-validations`)
  are not evaluated: the test asserts the manifest leaves those fields unset.
- k8s/redis.yaml, the Secrets and the model volume: core Kubernetes kinds, whose OpenAPI schema is
  not here offline: their essentials and their cross-references are checked.
"""

from __future__ import annotations

import copy
import importlib
import os
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
RAYSERVICE_CRD = REPO / "tests" / "data" / "kuberay" / "ray.io_rayservices.yaml"  # KubeRay's, unchanged

CONFIGS = REPO / "configs"
K8S = REPO / "k8s"
CLUSTER_CONFIGS = ["six-gpu-aws.yaml", "six-gpu-onprem.yaml"]
SERVE_CONFIGS = ["serve.yaml", "serve-six-gpu.yaml"]
BUILDER = "expertmap.cluster.serve_app:build_app"
# The builder's arguments (cluster.serve_args's args model).
BUILDER_ARGS = {
    "model",
    "gpus",
    "budget",
    "policy",
    "prefetch_distance",
    "redis_url",
    "max_queue",
    "api_keys_env",
    "host",
    "port",
}

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# Ray 2.60's own modules still use pydantic-1-style Field arguments
pytestmark = pytest.mark.filterwarnings(r"ignore::DeprecationWarning:ray\..*")


def load(path: Path):
    return yaml.load(path.read_text(), Loader=_Loader)


def load_all(path: Path) -> list:
    return [d for d in yaml.load_all(path.read_text(), Loader=_Loader) if d is not None]


def _ray_modules():
    """Ray's validators, imported only by the tests that need them (local-only mode, DESIGN section 9)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
        from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema
    except ImportError as exc:  # pragma: no cover - a set-up mistake, reported as such
        pytest.fail(f"ray[serve] is not installed ({exc}); install the test extra: pip install -e '.[test]'")
    return prepare_config, validate_config, ServeDeploySchema, ServeApplicationSchema


# --- model presets ----------------------------------------------------------------------------


PRESETS = sorted((CONFIGS / "models").glob("*.yaml"))


def test_presets_exist():
    names = {p.stem for p in PRESETS}
    assert {"expertmap-moe-tiny", "mixtral-8x7b", "qwen1.5-moe-a2.7b", "phi-3.5-moe"} <= names, names


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_arithmetic(path):
    from expertmap.actors.adapters import ADAPTERS

    p = load(path)
    assert p["name"] == path.stem
    assert p["model_type"] in ADAPTERS, f"{path.name}: no adapter for model_type {p['model_type']!r}"
    assert p["expert_bytes"] == 3 * p["hidden_size"] * p["moe_intermediate_size"] * p["bytes_per_param"]
    assert p["total_expert_bytes"] == p["expert_bytes"] * p["num_moe_layers"] * p["num_experts"]
    assert 1 <= p["top_k"] <= p["num_experts"]
    assert 1 <= p["prefetch_distance"] < p["num_moe_layers"]
    assert 0 < p["default_budget"] <= 1
    # the smallest budget the cache accepts is top-k experts
    assert p["default_budget"] * p["num_experts"] * p["num_moe_layers"] >= p["top_k"]


def test_bundled_preset_matches_the_checkpoint():
    import json

    p = load(CONFIGS / "models" / "expertmap-moe-tiny.yaml")
    cfg = json.loads((REPO / p["model"] / "config.json").read_text())
    assert cfg["architectures"] == [p["architecture"]] and cfg["model_type"] == p["model_type"]
    assert (cfg["hidden_size"], cfg["intermediate_size"]) == (p["hidden_size"], p["moe_intermediate_size"])
    assert (cfg["num_hidden_layers"], cfg["num_local_experts"], cfg["num_experts_per_tok"]) == (
        p["num_moe_layers"],
        p["num_experts"],
        p["top_k"],
    )
    assert {"float32": 4, "bfloat16": 2, "float16": 2}[cfg["dtype"]] == p["bytes_per_param"]


# --- ray up cluster configs -------------------------------------------------------------------


def _cluster(name: str) -> dict:
    return load(CONFIGS / "cluster" / name)


@pytest.mark.parametrize("name", CLUSTER_CONFIGS)
def test_cluster_config_passes_rays_validator(name):
    prepare_config, validate_config, *_ = _ray_modules()
    prepared = prepare_config(_cluster(name))
    validate_config(prepared)
    # the setup installs this project (with Ray pinned by the serve extra) from the synced repo
    assert "~/expertmap" in prepared["file_mounts"]
    setup = " ".join(prepared["head_setup_commands"] + prepared["worker_setup_commands"])
    assert "expertmap[serve" in setup and "download.pytorch.org/whl/cpu" in setup


def test_aws_cluster_has_a_gpu_free_head_and_six_gpus():
    prepare_config, *_ = _ray_modules()
    cfg = prepare_config(_cluster("six-gpu-aws.yaml"))
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["max_workers"] == 0
    workers = [t for n, t in types.items() if n != cfg["head_node_type"]]
    assert [w["resources"]["GPU"] for w in workers] == [6]
    assert workers[0]["min_workers"] == workers[0]["max_workers"] == cfg["max_workers"] == 1
    assert "--num-gpus=0" in " ".join(cfg["head_start_ray_commands"])


def test_onprem_cluster_starts_six_gpus_on_the_worker():
    prepare_config, *_ = _ray_modules()
    cfg = prepare_config(_cluster("six-gpu-onprem.yaml"))
    assert cfg["provider"]["type"] == "local" and len(cfg["provider"]["worker_ips"]) == 1
    assert "--num-gpus=0" in " ".join(cfg["head_start_ray_commands"])
    assert "--num-gpus=6" in " ".join(cfg["worker_start_ray_commands"])


def _set(path: str, value):
    """A mutation: set the dotted path to value (None: delete it)."""

    def apply(cfg):
        *parents, last = path.split(".")
        node = cfg
        for key in parents:
            node = node[key]
        if value is None:
            del node[last]
        else:
            node[last] = value

    return apply


@pytest.mark.parametrize(
    "name, mutate, error",
    [
        ("six-gpu-aws.yaml", _set("max_workers", "many"), "ValidationError"),
        ("six-gpu-aws.yaml", _set("provider", None), "KeyError|ValidationError"),
        ("six-gpu-aws.yaml", _set("setup_command", ["typo"]), "ValidationError"),
        ("six-gpu-aws.yaml", _set("available_node_types.gpu-worker.resources.GPU", "6"), "ValidationError"),
        ("six-gpu-aws.yaml", _set("head_node_type", "gpu-head"), "ValueError"),
        ("six-gpu-aws.yaml", _set("available_node_types.gpu-worker.node_config", None), "ValidationError"),
        ("six-gpu-onprem.yaml", _set("provider.worker_ips", "192.0.2.11"), "ValidationError"),
        ("six-gpu-onprem.yaml", _set("provider.head_ip", None), "ClickException"),
        ("six-gpu-onprem.yaml", _set("max_workers", "many"), "ValidationError|TypeError"),
    ],
    ids=[
        "max_workers-string",
        "no-provider",
        "unknown-key",
        "gpu-string",
        "bad-head-type",
        "no-node-config",
        "worker_ips-string",
        "no-head_ip",
        "onprem-max_workers-string",
    ],
)
def test_broken_cluster_config_fails(name, mutate, error):
    prepare_config, validate_config, *_ = _ray_modules()
    cfg = _cluster(name)
    mutate(cfg)
    with pytest.raises(Exception) as info:
        validate_config(prepare_config(cfg))
    names = {c.__name__ for c in type(info.value).__mro__}
    assert names & set(error.split("|")), f"raised {type(info.value).__name__}: {info.value}"


# --- Serve configs ------------------------------------------------------------------------------


def _rayservice() -> dict:
    docs = load_all(K8S / "rayservice.yaml")
    assert [d["kind"] for d in docs] == ["RayService"]
    return docs[0]


def _serve_configs() -> dict[str, dict]:
    out = {name: load(CONFIGS / name) for name in SERVE_CONFIGS}
    out["rayservice serveConfigV2"] = yaml.safe_load(_rayservice()["spec"]["serveConfigV2"])
    return out


def _check_serve_config(cfg: dict) -> None:
    """ServeDeploySchema, and what it lets through: unknown keys, relative route prefixes, and the builder's args."""
    _, _, ServeDeploySchema, ServeApplicationSchema = _ray_modules()
    schema = ServeDeploySchema.model_validate(cfg)
    unknown = set(cfg) - set(ServeDeploySchema.model_fields)
    assert not unknown, f"unknown top-level keys {sorted(unknown)} (ServeDeploySchema ignores them)"
    for app in cfg["applications"]:
        unknown = set(app) - set(ServeApplicationSchema.model_fields)
        assert not unknown, f"unknown application keys {sorted(unknown)}"
        assert app.get("route_prefix", "/").startswith("/"), "route_prefix must start with /"
    assert [a.import_path for a in schema.applications] == [BUILDER]


def _check_builder_args(args: dict, http: dict) -> None:
    from expertmap.actors.config import Budget
    from expertmap.predictor.policies import POLICIES

    assert set(args) <= BUILDER_ARGS, f"unknown builder args {sorted(set(args) - BUILDER_ARGS)}"
    assert isinstance(args["gpus"], int) and args["gpus"] >= 1, f"gpus must be a positive int, not {args['gpus']!r}"
    assert args["policy"] in POLICIES, f"unknown policy {args['policy']!r}"
    Budget.parse(args["budget"])
    assert isinstance(args["prefetch_distance"], int) and args["prefetch_distance"] >= 1
    assert isinstance(args["max_queue"], int) and args["max_queue"] >= 1
    assert (args["host"], args["port"]) == (http["host"], http["port"]), "args host/port differ from http_options"
    if args["host"] not in ("127.0.0.1", "localhost", "::1"):
        assert args.get("api_keys_env"), "an endpoint bound beyond loopback must require API keys"
    # the preset for this model agrees on the prefetch distance
    for preset in map(load, PRESETS):
        if preset["model"] == args["model"]:
            assert preset["prefetch_distance"] == args["prefetch_distance"], preset["name"]
            break
    else:
        pytest.fail(f"no preset in configs/models/ for model {args['model']!r}")
    # once the lead's builder exists, its own args model must accept these args
    if (REPO / "cluster" / "serve_args.py").exists():
        from pydantic import BaseModel

        module = importlib.import_module("expertmap.cluster.serve_args")
        models = [
            m
            for m in vars(module).values()
            if isinstance(m, type) and issubclass(m, BaseModel) and {"gpus", "budget"} <= set(m.model_fields)
        ]
        for model in models:
            model.model_validate(args)


@pytest.mark.parametrize("name", [*SERVE_CONFIGS, "rayservice serveConfigV2"])
def test_serve_config_validates(name):
    cfg = _serve_configs()[name]
    _check_serve_config(cfg)
    (app,) = cfg["applications"]
    _check_builder_args(app["args"], cfg["http_options"])


def test_serve_defaults_are_the_embedded_ones():
    cfg = load(CONFIGS / "serve.yaml")
    assert cfg["http_options"] == {"host": "127.0.0.1", "port": 8000}
    args = cfg["applications"][0]["args"]
    assert args["model"] == "models/expertmap-moe-tiny" and (REPO / args["model"] / "config.json").exists()
    assert args["redis_url"] is None and args["gpus"] == 1


def test_rayservice_serves_the_six_gpu_config():
    assert _serve_configs()["rayservice serveConfigV2"] == load(CONFIGS / "serve-six-gpu.yaml")


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda c: c["applications"][0].pop("import_path"), "import_path"),
        (lambda c: c["applications"][0].__setitem__("import_path", "serve_app"), "import_path"),
        (lambda c: c["applications"].append(copy.deepcopy(c["applications"][0])), "applications"),
        (lambda c: c["http_options"].__setitem__("port", "eighty"), "http_options.port"),
        (lambda c: c.__setitem__("proxy_location", "Everywhere"), "proxy_location"),
        (lambda c: c.__setitem__("aplications", c.pop("applications")), "applications"),
        (
            lambda c: c["applications"][0].__setitem__("arg", c["applications"][0].pop("args")),
            "unknown application keys",
        ),
        (lambda c: c["applications"][0].__setitem__("route_prefix", "v1"), "route_prefix"),
    ],
    ids=[
        "no-import_path",
        "bad-import_path",
        "duplicate-app",
        "port-string",
        "bad-proxy_location",
        "misspelt-applications",
        "misspelt-args",
        "relative-route",
    ],
)
def test_broken_serve_config_fails(mutate, match):
    _ray_modules()
    cfg = load(CONFIGS / "serve.yaml")
    mutate(cfg)
    with pytest.raises((ValueError, AssertionError), match=match):  # pydantic's ValidationError is a ValueError
        _check_serve_config(cfg)


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("gpus", "six", "gpus"),
        ("policy", "psychic", "policy"),
        ("budget", 1.5, "out of range"),
        ("hots", "0.0.0.0", "unknown builder args"),
        ("port", 9000, "host/port"),
    ],
)
def test_broken_builder_args_fail(key, value, match):
    cfg = load(CONFIGS / "serve.yaml")
    cfg["applications"][0]["args"][key] = value
    with pytest.raises((ValueError, AssertionError), match=match):
        _check_builder_args(cfg["applications"][0]["args"], cfg["http_options"])


# --- the RayService against the KubeRay CRD ---------------------------------------------------------


@pytest.fixture(scope="module")
def rayservice_schema() -> dict:
    if not RAYSERVICE_CRD.exists():
        pytest.fail(
            f"the KubeRay RayService CRD is missing: expected {RAYSERVICE_CRD} (it is part of the repository)"
        )
    crd = load(RAYSERVICE_CRD)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1" and v.get("served")]
    return version["schema"]["openAPIV3Schema"]


def _strict(schema):
    """A copy of a CRD schema for a JSON Schema validator: Kubernetes extensions dropped, unknown fields refused.

    Kubernetes prunes (default) or, with kubectl's default --validate=strict, rejects fields a structural
    schema does not name; objects with `properties` and no `additionalProperties` get
    `additionalProperties: false` unless they preserve unknown fields. `x-kubernetes-int-or-string`
    schemas already carry `anyOf: [integer, string]` (and a quantity `pattern`, which applies to strings only).
    """
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if schema.get("x-kubernetes-int-or-string") and "anyOf" not in out and "type" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _list_map_errors(schema: dict, value, path: str = "") -> list[str]:
    """`x-kubernetes-list-type: map|set`: the API server refuses duplicate keys (e.g. two env vars of one name)."""
    errors = []
    if isinstance(value, list):
        kind = schema.get("x-kubernetes-list-type")
        if kind == "map":
            keys = [tuple(item.get(k) for k in schema["x-kubernetes-list-map-keys"]) for item in value]
            errors += [f"{path}: duplicate key {k}" for k in {k for k in keys if keys.count(k) > 1}]
        elif kind == "set":
            seen = [repr(v) for v in value]
            errors += [f"{path}: duplicate item {v}" for v in {v for v in seen if seen.count(v) > 1}]
        for i, item in enumerate(value):
            errors += _list_map_errors(schema.get("items", {}), item, f"{path}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            sub = schema.get("properties", {}).get(key)
            if sub is None and isinstance(schema.get("additionalProperties"), dict):
                sub = schema["additionalProperties"]
            if sub is not None:
                errors += _list_map_errors(sub, item, f"{path}.{key}")
    return errors


def _cel_paths(schema: dict, path: tuple = ()) -> list[tuple]:
    """Paths (property names) of fields whose CRD rules are CEL (`x-kubernetes-validations`), not evaluated here."""
    found = [path] if "x-kubernetes-validations" in schema else []
    for key, sub in schema.get("properties", {}).items():
        found += _cel_paths(sub, (*path, key))
    return found


def _crd_errors(schema: dict, manifest: dict) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft4Validator(
        _strict(schema)
    )  # OpenAPI 3.0 schemas follow draft 4 (boolean exclusiveMinimum)
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest)]
    return errors + _list_map_errors(schema, manifest)


def test_rayservice_matches_the_crd(rayservice_schema):
    manifest = _rayservice()
    assert manifest["apiVersion"] == "ray.io/v1"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", manifest["metadata"]["name"])
    assert _crd_errors(rayservice_schema, manifest) == []
    # the CEL-checked fields are left at their defaults, so the unchecked rules cannot fail
    for path in _cel_paths(rayservice_schema):
        node = manifest
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        assert node is None, f"{'.'.join(path)} is set but its CEL rule is not checked offline"


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda s: s["rayClusterConfig"]["workerGroupSpecs"][0].__setitem__("replicas", "six"), "replicas"),
        (lambda s: s["rayClusterConfig"]["workerGroupSpecs"][0].pop("groupName"), "groupName"),
        (lambda s: s["rayClusterConfig"].pop("headGroupSpec"), "headGroupSpec"),
        (
            lambda s: s["rayClusterConfig"]["workerGroupSpecs"][0]["rayStartParams"].__setitem__("num-gpus", 6),
            "num-gpus",
        ),
        (
            lambda s: s["rayClusterConfig"].__setitem__(
                "workerGroupSpec", s["rayClusterConfig"].pop("workerGroupSpecs")
            ),
            "workerGroupSpec",
        ),
        (lambda s: _worker(s)["resources"]["limits"].__setitem__("memory", "lots"), "memory"),
        (lambda s: _worker(s)["env"].append(copy.deepcopy(_worker(s)["env"][0])), "duplicate key"),
        (lambda s: s.__setitem__("serveConfigV2", yaml.safe_load(s["serveConfigV2"])), "serveConfigV2"),
    ],
    ids=[
        "replicas-string",
        "no-groupName",
        "no-headGroupSpec",
        "num-gpus-int",
        "misspelt-workerGroupSpecs",
        "bad-quantity",
        "duplicate-env",
        "serveConfigV2-not-string",
    ],
)
def test_broken_rayservice_fails(rayservice_schema, mutate, needle):
    manifest = _rayservice()
    mutate(manifest["spec"])
    errors = _crd_errors(rayservice_schema, manifest)
    assert errors and any(needle in e for e in errors), errors


def _worker(spec: dict) -> dict:
    return spec["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]


def _quantity(q) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "": 1}
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(q)).groups()
    return float(number) * units[unit]


def _secret_ref(container: dict, var: str) -> tuple[str, str]:
    (env,) = [e for e in container["env"] if e["name"] == var]
    ref = env["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


def test_rayservice_layout():
    spec = _rayservice()["spec"]
    rc = spec["rayClusterConfig"]
    head = rc["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0" and head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    for c in head["template"]["spec"]["containers"]:
        assert "nvidia.com/gpu" not in str(c.get("resources")), "the head must not ask for GPUs"
    (group,) = rc["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 1
    assert group["rayStartParams"]["num-gpus"] == "6"
    pod = group["template"]["spec"]
    worker = _worker(spec)
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 6
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    # host RAM for every routed expert of the served model, with room to spare
    serve = yaml.safe_load(spec["serveConfigV2"])
    (preset,) = [p for p in map(load, PRESETS) if p["model"] == serve["applications"][0]["args"]["model"]]
    assert _quantity(worker["resources"]["limits"]["memory"]) >= 2 * preset["total_expert_bytes"]
    # /dev/shm in memory, big enough for the object store Ray is told to use
    for template, params in ((head["template"], head["rayStartParams"]), (group["template"], group["rayStartParams"])):
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        (mount,) = [
            m for c in template["spec"]["containers"] for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"
        ]
        shm = volumes[mount["name"]]["emptyDir"]
        assert shm["medium"] == "Memory"
        assert _quantity(shm["sizeLimit"]) >= int(params["object-store-memory"])
    # secrets come from Secrets, by the names the example Secrets and redis.yaml use
    redis_secret = load(K8S / "redis-secret.example.yaml")
    keys_secret = load(K8S / "api-keys-secret.example.yaml")
    for container in [*head["template"]["spec"]["containers"], worker]:
        assert _secret_ref(container, "REDIS_PASSWORD") == (redis_secret["metadata"]["name"], "password")
        assert _secret_ref(container, serve["applications"][0]["args"]["api_keys_env"]) == (
            keys_secret["metadata"]["name"],
            "keys",
        )
    # the model volume is the one k8s/models-pvc.yaml creates
    (claim,) = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
    pvcs = [d["metadata"]["name"] for d in load_all(K8S / "models-pvc.yaml") if d["kind"] == "PersistentVolumeClaim"]
    assert claim in pvcs
    assert any(m["mountPath"] == "/models" for m in worker["volumeMounts"])


# --- Redis, Secrets ---------------------------------------------------------------------------------


def test_redis_manifests():
    docs = {d["kind"]: d for d in load_all(K8S / "redis.yaml")}
    assert set(docs) == {"PersistentVolumeClaim", "Deployment", "Service", "NetworkPolicy"}
    secret = load(K8S / "redis-secret.example.yaml")
    assert secret["kind"] == "Secret" and "password" in secret["stringData"]
    assert "REPLACE" in secret["stringData"]["password"], "the example Secret must hold a placeholder"

    deployment = docs["Deployment"]
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    assert _secret_ref(container, "REDIS_PASSWORD") == (secret["metadata"]["name"], "password")
    script = " ".join(container.get("command", []) + container.get("args", []))
    assert "--appendonly yes" in script
    assert "requirepass $REDIS_PASSWORD" in script, "requirepass must come from the Secret"
    # data on the PVC
    (mount,) = container["volumeMounts"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert (
        volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
        == docs["PersistentVolumeClaim"]["metadata"]["name"]
    )
    assert mount["mountPath"] == "/data" and "--dir /data" in script

    service = docs["Service"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["port"] == 6379
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP", "Redis must not leave the cluster"
    # the Serve config reaches it by the Service's name
    redis_url = load(CONFIGS / "serve-six-gpu.yaml")["applications"][0]["args"]["redis_url"]
    assert re.fullmatch(rf"redis://:\$\{{REDIS_PASSWORD\}}@{service['metadata']['name']}:6379/\d+", redis_url)
    # and only the Ray pods may connect
    policy = docs["NetworkPolicy"]["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (allowed,) = [f["podSelector"]["matchLabels"] for rule in policy["ingress"] for f in rule["from"]]
    rc = _rayservice()["spec"]["rayClusterConfig"]
    for template in [rc["headGroupSpec"]["template"], *(g["template"] for g in rc["workerGroupSpecs"])]:
        assert allowed.items() <= template["metadata"]["labels"].items()


def test_example_secrets_hold_placeholders():
    for name in ("redis-secret.example.yaml", "api-keys-secret.example.yaml"):
        secret = load(K8S / name)
        assert secret["kind"] == "Secret" and secret["apiVersion"] == "v1"
        assert all("REPLACE" in v for v in secret["stringData"].values()), name
