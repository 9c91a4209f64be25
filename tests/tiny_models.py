"""Tiny random checkpoints of every supported MoE family, for adapter and engine tests.

``TINY_CONFIGS[name]()`` builds a config small enough that a saved model stays well under 1 MB;
``save_tiny(name, folder)`` builds the model from it, re-initialises the weights and saves it with
``save_pretrained`` (safetensors), so the on-disk key names are the ones transformers itself writes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV3Config,
    GptOssConfig,
    MixtralConfig,
    OlmoeConfig,
    PhimoeConfig,
    PretrainedConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

#: Shape fields shared by every tiny config.
_COMMON = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    num_experts_per_tok=2,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
#: Multi-head latent attention, shrunk (DeepSeek V2 / V3).
_MLA = dict(q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8)

ROUTER_STD = 0.5  # large enough that tokens pick different experts
WEIGHT_STD = 0.02
_ROUTER_PARAM = re.compile(r"\.mlp\.(gate|router)\.(weight|bias)$")


def _mixtral() -> PretrainedConfig:
    return MixtralConfig(**_COMMON, num_hidden_layers=2, num_local_experts=4)


def _qwen2_moe() -> PretrainedConfig:
    return Qwen2MoeConfig(
        **_COMMON, num_hidden_layers=3, mlp_only_layers=[0], num_experts=8, moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
    )  # fmt: skip


def _qwen3_moe() -> PretrainedConfig:
    return Qwen3MoeConfig(**_COMMON, num_hidden_layers=2, num_experts=8, moe_intermediate_size=32, head_dim=8)


def _olmoe() -> PretrainedConfig:
    return OlmoeConfig(**_COMMON, num_hidden_layers=2, num_experts=4)


def _phimoe() -> PretrainedConfig:
    return PhimoeConfig(**_COMMON, num_hidden_layers=2, num_local_experts=4)


def _deepseek_v2() -> PretrainedConfig:
    return DeepseekV2Config(
        **_COMMON, **_MLA, num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=8,
        n_shared_experts=1, moe_intermediate_size=32,
    )  # fmt: skip


def _deepseek_v3() -> PretrainedConfig:
    return DeepseekV3Config(
        **_COMMON, **_MLA, num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=8,
        n_shared_experts=1, moe_intermediate_size=32, n_group=2, topk_group=1,
    )  # fmt: skip


def _gpt_oss() -> PretrainedConfig:
    return GptOssConfig(
        **_COMMON, num_hidden_layers=2, num_local_experts=4, head_dim=8, sliding_window=16,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},  # default YaRN assumes 4k+ context
    )  # fmt: skip


TINY_CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "olmoe": _olmoe,
    "phimoe": _phimoe,
    "deepseek_v2": _deepseek_v2,
    "deepseek_v3": _deepseek_v3,
    "gpt_oss": _gpt_oss,
}


@torch.no_grad()
def _reinit(model: torch.nn.Module) -> None:
    """Normal(0, 0.02) everywhere except norms; routers get a wide normal so routing varies by token.

    Biases (GPT-OSS experts and router, attention sinks) are made non-zero too, so a checkpoint
    reader that drops them is caught.
    """
    for name, param in model.named_parameters():
        if _ROUTER_PARAM.search(name):
            param.normal_(0.0, ROUTER_STD)
        elif param.dim() >= 2 or "norm" not in name:
            param.normal_(0.0, WEIGHT_STD)


def save_tiny(name: str, folder: Path, seed: int = 0) -> Path:
    """Build the tiny ``name`` model with random weights and ``save_pretrained`` it into ``folder``."""
    folder = Path(folder)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[name]())
    _reinit(model)
    model.save_pretrained(folder)
    return folder
