"""Typed configuration of the engine, passed down explicitly (no environment reads below the CLI)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from expertmap.actors import defaults
from expertmap.actors.defaults import BUNDLED_MODEL  # package data; re-exported here

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


class Budget(BaseModel):
    """Device memory for cached experts: a fraction of all routed-expert bytes, or absolute bytes."""

    model_config = ConfigDict(frozen=True)
    fraction: float | None = None
    bytes: int | None = None

    @classmethod
    def parse(cls, value: str | float | int | Budget) -> Budget:
        """'0.25', '25%', '2GiB', '512MiB', 0.25 -> Budget. Raises ValueError with the reason."""
        if isinstance(value, Budget):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return cls._fraction(float(value), value)
        text = str(value).strip()
        if text.endswith("%"):
            return cls._fraction(_number(text[:-1], value) / 100.0, value)
        m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)", text)
        if not m:
            raise ValueError(f"budget {value!r} is not a fraction (0.25), a percentage (25%) or a size (2GiB)")
        number, unit = float(m.group(1)), m.group(2).lower()
        if unit == "":
            return cls._fraction(number, value)
        if unit not in _UNITS:
            raise ValueError(f"budget {value!r} has unknown unit {m.group(2)!r}; use B, KiB, MiB, GiB, KB, MB or GB")
        size = int(number * _UNITS[unit])
        if size <= 0:
            raise ValueError(f"budget {value!r} must be more than 0 bytes")
        return cls(bytes=size)

    @classmethod
    def _fraction(cls, f: float, raw: object) -> Budget:
        if not 0.0 < f <= 1.0:
            raise ValueError(f"budget {raw!r} is out of range: a fraction must be in (0, 1] (1 = all experts)")
        return cls(fraction=f)

    def resolve(self, total_expert_bytes: int) -> int:
        if self.bytes is not None:
            return self.bytes
        assert self.fraction is not None
        return int(self.fraction * total_expert_bytes)

    def __str__(self) -> str:
        return f"{self.fraction:g}" if self.fraction is not None else f"{self.bytes}B"


def bundled_or_path(model: str | Path) -> Path:
    """A bundled model's folder if ``model`` is its name (``defaults.BUNDLED_MODELS``) and no such
    path exists here, else ``model`` as a Path (not checked)."""
    if str(model) in defaults.BUNDLED_MODELS and not Path(model).exists():
        return defaults.BUNDLED_MODELS[str(model)]
    return Path(model)


def require_model_folder(path: str | Path) -> Path:
    """The model folder ``path`` names: a bundled model's name (``defaults.BUNDLED_MODELS``) or a
    Hugging Face model folder (has config.json); ValueError naming the bad value otherwise."""
    folder = bundled_or_path(path)
    if not folder.is_dir():
        names = ", ".join(defaults.BUNDLED_MODELS)
        raise ValueError(f"model {str(path)!r} does not exist: neither a folder nor a bundled model name ({names})")
    if not (folder / "config.json").exists():
        raise ValueError(f"model folder {str(path)!r} has no config.json: not a Hugging Face model folder")
    return folder


def _number(text: str, raw: object) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"budget {raw!r} is not a number") from None


class LinkConfig(BaseModel):
    """How host->device copies are timed.

    ``mode='cuda'``: real copies on a dedicated CUDA stream. ``mode='emulated'``: on a CPU device the
    transfer engine copies the bytes and then holds the link for bytes / bandwidth. The bandwidth
    is either given (``bandwidth_bytes_per_s``) or derived from ``copy_layer_ratio`` (one expert's
    copy time in units of one decoder layer's decode time, measured at start-up). ``mode='instant'``:
    no link delay (a test aid; never report timings from it).
    """

    model_config = ConfigDict(frozen=True)
    mode: Literal["auto", "cuda", "emulated", "instant"] = "auto"
    profile: str = defaults.LINK
    copy_layer_ratio: float | None = Field(default=None, gt=0)
    bandwidth_bytes_per_s: float | None = Field(default=None, gt=0)


#: What a miss does: ``copy`` (wait for the link), ``host`` (compute on the host), ``auto`` (cost model).
MISS_MODES = ("copy", "host", "auto")
MissMode = Literal["copy", "host", "auto"]


class HostConfig(BaseModel):
    """How an expert computed on the host (a miss that does not wait for the link) is timed.

    ``decode_ratio``: one expert's host compute for one decode token, in decode-layer times;
    ``crossover_tokens``: from this many tokens on the host is compute-bound (time grows with the
    tokens); ``stages_per_node``: pipeline stages sharing this host's memory bandwidth (None: every
    stage of the pipeline). Unset ratios are derived from ``profile`` when the engine starts
    (``expertmap.actors.host_profiles.host_config`` is the one parser of host names).
    """

    model_config = ConfigDict(frozen=True)
    profile: str = defaults.HOST
    decode_ratio: float | None = Field(default=None, gt=0)
    crossover_tokens: float | None = Field(default=None, gt=0)
    stages_per_node: int | None = Field(default=None, ge=1)


class EngineConfig(BaseModel):
    """Everything one offloading engine (one device, one shard of layers) needs."""

    model_config = ConfigDict(frozen=True)
    model: Path = BUNDLED_MODEL
    device: str = "cpu"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    policy: str = defaults.POLICY
    budget: Budget = Budget.parse(defaults.BUDGET)
    link: LinkConfig = LinkConfig()
    prefetch: bool = True  # False: the policy's eviction rule alone (ablation)
    miss: MissMode = defaults.MISS  # copy: today's behaviour; host / auto: actors/host_compute.py
    host: HostConfig = HostConfig()
    pin_host_memory: bool = True  # only applies on CUDA
    seed: int = 0

    @field_validator("budget", mode="before")
    @classmethod
    def _parse_budget(cls, v):
        return Budget.parse(v)

    @field_validator("model")
    @classmethod
    def _model_exists(cls, v: Path) -> Path:
        return require_model_folder(v)
