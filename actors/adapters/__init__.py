"""Architecture adapters, one file per model family; ``adapter_for(config)`` picks one."""

from __future__ import annotations

from typing import Any

from expertmap.actors.adapters.base import ArchitectureAdapter, MoELayer
from expertmap.actors.adapters.deepseek_v2 import DeepseekV2Adapter
from expertmap.actors.adapters.deepseek_v3 import DeepseekV3Adapter
from expertmap.actors.adapters.gpt_oss import GptOssAdapter
from expertmap.actors.adapters.mixtral import MixtralAdapter
from expertmap.actors.adapters.olmoe import OlmoeAdapter
from expertmap.actors.adapters.phimoe import PhimoeAdapter
from expertmap.actors.adapters.qwen2_moe import Qwen2MoeAdapter
from expertmap.actors.adapters.qwen3_moe import Qwen3MoeAdapter

ADAPTERS: dict[str, ArchitectureAdapter] = {}
for _adapter in (
    MixtralAdapter(),
    Qwen2MoeAdapter(),
    Qwen3MoeAdapter(),
    OlmoeAdapter(),
    PhimoeAdapter(),
    DeepseekV2Adapter(),
    DeepseekV3Adapter(),
    GptOssAdapter(),
):
    for _model_type in _adapter.model_types:
        ADAPTERS[_model_type] = _adapter


class UnsupportedArchitectureError(ValueError):
    pass


def adapter_for(config: Any) -> ArchitectureAdapter:
    model_type = getattr(config, "model_type", None)
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not a supported MoE architecture; supported: {', '.join(sorted(ADAPTERS))}"
        ) from None


__all__ = ["ADAPTERS", "ArchitectureAdapter", "MoELayer", "UnsupportedArchitectureError", "adapter_for"]
