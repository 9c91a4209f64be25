"""The Serve application's arguments: ``applications[].args`` in configs/serve*.yaml and k8s/.

``AppArgs`` validates them (before any actor starts: in ``build_app`` and in ``expertmap serve``),
``check_exposure`` refuses an endpoint beyond loopback without API keys, and ``engine_config`` /
``make_pipeline`` turn them into the pipeline the replica runs. Nothing here imports Ray Serve.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from expertmap.actors import defaults
from expertmap.actors.config import Budget, bundled_or_path

#: Relative model paths resolve against this folder: the repository root in a checkout, the
#: ``expertmap`` package folder of a wheel (where ``models/`` is package data).
REPO_ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class AppArgs(BaseModel):
    """The builder's args (``applications[].args`` in configs/serve*.yaml)."""

    model_config = ConfigDict(extra="forbid")

    model: str = str(defaults.BUNDLED_MODEL)  # relative paths resolve against REPO_ROOT
    gpus: int = Field(default=1, ge=1)  # pipeline stages, one per GPU
    budget: str | float = defaults.BUDGET
    policy: str = defaults.SERVE_POLICY
    prefetch_distance: int = Field(default=defaults.PREFETCH_DISTANCE, ge=1)
    redis_url: str | None = None  # None: the embedded in-process expert-map store
    store_capacity: int = Field(default=1000, ge=1, le=4096)  # expert maps the store keeps (FineMoE: 1,000)
    max_queue: int = Field(default=64, ge=1)  # requests admitted at once (generating or waiting); beyond: 429
    max_batch: int = Field(default=defaults.MAX_BATCH, ge=1)  # requests per pipeline micro-batch at most
    max_body_bytes: int = Field(default=1 << 20, ge=1024)  # larger request bodies get 413
    max_tokens_limit: int = Field(default=1024, ge=1)  # most tokens one choice may ask for (400 beyond)
    api_keys_env: str | None = None  # env var holding accepted API keys, comma-separated
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    # not in the bundled configs; defaults are the embedded ones
    link: str = defaults.LINK  # a link profile (expertmap.actors.link_profiles), "instant" or "cuda"
    device: str = "auto"  # auto: cuda when the replica sees one, else cpu
    miss: str = defaults.MISS  # copy | host | auto: what a miss does (actors/host_compute.py)
    host_profile: str = defaults.HOST  # host profile for misses computed on the host, or ratio:R
    allow_unauthenticated: bool = False  # serve beyond loopback without API keys (explicit opt-in)

    @field_validator("gpus", "prefetch_distance", "max_queue", "max_batch", "max_body_bytes", "max_tokens_limit", "store_capacity", "port",
                     mode="before")  # fmt: skip
    @classmethod
    def _strict_int(cls, v):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"must be an integer, not {v!r}")
        return v

    @field_validator("budget")
    @classmethod
    def _budget(cls, v):
        Budget.parse(v)  # raises ValueError with the reason
        return v

    @field_validator("policy")
    @classmethod
    def _policy(cls, v):
        from expertmap.predictor.policies import POLICIES

        if v not in POLICIES:
            raise ValueError(f"unknown policy {v!r}; choose one of: {', '.join(sorted(POLICIES))}")
        return v

    @field_validator("miss")
    @classmethod
    def _miss(cls, v):
        from expertmap.actors.host_compute import check_miss_mode

        return check_miss_mode(v)

    @field_validator("host_profile")
    @classmethod
    def _host_profile(cls, v):
        from expertmap.actors.host_profiles import host_config

        host_config(v)  # raises ValueError naming the bad value
        return v

    @field_validator("redis_url")
    @classmethod
    def _expand(cls, v):
        return os.path.expandvars(v) if v else v

    @property
    def model_path(self) -> Path:
        p = bundled_or_path(Path(self.model).expanduser())
        return p if p.is_absolute() else REPO_ROOT / p

    @property
    def model_id(self) -> str:
        return self.model_path.name


def parse_args(args: dict | AppArgs | None) -> AppArgs:
    if isinstance(args, AppArgs):
        return args
    return AppArgs.model_validate(dict(args or {}))


def read_api_keys(env_name: str | None) -> frozenset[str]:
    """The keys in the environment variable ``env_name`` (comma-separated); none without a name."""
    if not env_name:
        return frozenset()
    return frozenset(k.strip() for k in os.environ.get(env_name, "").split(",") if k.strip())


def check_exposure(a: AppArgs) -> None:
    """Refuse to build an endpoint beyond loopback without keys, and a keys variable that is empty."""
    keys = read_api_keys(a.api_keys_env)
    if a.api_keys_env and not keys:
        raise ValueError(
            f"api_keys_env names {a.api_keys_env!r}, but that environment variable is unset or holds no keys "
            "(set it to comma-separated keys, or set api_keys_env to null)"
        )
    if a.host not in LOOPBACK and not keys and not a.allow_unauthenticated:
        raise ValueError(
            f"host {a.host!r} is reachable beyond this machine but no API keys are configured: set api_keys_env "
            "to an environment variable holding comma-separated keys (or pass allow_unauthenticated: true)"
        )


def engine_config(a: AppArgs):
    """The stages' engine configuration (``device: auto`` picks cuda when this process sees one)."""
    from expertmap.actors.config import EngineConfig
    from expertmap.actors.link_profiles import link_config

    device = a.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    from expertmap.actors.host_profiles import host_config

    return EngineConfig(model=a.model_path, device=device, policy=a.policy, budget=a.budget, link=link_config(a.link),
                        miss=a.miss, host=host_config(a.host_profile, a.link))  # fmt: skip


def make_pipeline(a: AppArgs):
    """The pipeline of ``a.gpus`` stages; map-based policies ("finemoe", "hybrid") share the expert-map
    service, backed by the Redis store named by ``redis_url`` or, without one, an in-process store
    in the service actor that fills as requests run. Needs a running Ray."""
    from expertmap.cluster.pipeline import Pipeline, PipelineConfig

    return Pipeline(PipelineConfig(engine=engine_config(a), gpus=a.gpus, max_batch=a.max_batch, redis_url=a.redis_url,
                                   prefetch_distance=a.prefetch_distance, store_capacity=a.store_capacity))  # fmt: skip
