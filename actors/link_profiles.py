"""Link profiles: how long one expert copy takes, in decoder-layer decode times, on real hardware.

The emulated link (docs/link-and-host-models.md) keeps the ratio that matters on real machines:
    ratio = (one expert's host->device copy time) / (one decoder layer's decode time)
and applies it to the small model's measured layer time. Each profile below derives the ratio
from public hardware figures and the real model's sizes; the arithmetic is in the code so it can
be checked and extended. Decode is memory-bound: a layer's decode time is the bytes it reads from
HBM (attention weights + the top-k experts' weights) divided by HBM bandwidth.

| profile | model | GPU (HBM) | link | expert copy | layer decode | ratio |
| --- | --- | --- | --- | --- | --- | --- |
(the table is printed by ``python -m expertmap.actors.link_profiles``)
"""

from __future__ import annotations

from dataclasses import dataclass

import math

from expertmap.actors import defaults
from expertmap.actors.config import LinkConfig

GB = 1e9


@dataclass(frozen=True)
class ModelFigures:
    name: str
    hidden: int
    expert_intermediate: int
    attention_params: int  # per layer: q, k, v, o projections
    top_k: int
    bytes_per_param: int = 2  # bf16
    shared_expert_params: int = 0  # per layer: always-resident shared experts, read at every decode step

    @property
    def expert_bytes(self) -> int:
        return 3 * self.hidden * self.expert_intermediate * self.bytes_per_param

    @property
    def layer_read_bytes(self) -> int:
        resident = (self.attention_params + self.shared_expert_params) * self.bytes_per_param
        return resident + self.top_k * self.expert_bytes


# Mixtral-8x7B: hidden 4096, expert FFN 14336, 32 q heads x 128, 8 kv heads x 128, top-2.
MIXTRAL_8X7B = ModelFigures("Mixtral-8x7B", 4096, 14336, 4096 * 4096 * 2 + 4096 * 1024 * 2, 2)
# Qwen1.5-MoE-A2.7B (Qwen/Qwen1.5-MoE-A2.7B config.json): hidden 2048, expert FFN 1408, 16 heads x
# 128 (MHA), top-4 of 60 routed experts plus one shared expert of FFN 5632 (its sigmoid gate, 2048
# parameters, left out), read at every decode step.
QWEN15_MOE = ModelFigures("Qwen1.5-MoE-A2.7B", 2048, 1408, 2048 * 2048 * 4, 4, shared_expert_params=3 * 2048 * 5632)
# Phi-3.5-MoE: hidden 4096, expert FFN 6400, 32 q heads, 8 kv heads x 128, top-2 of 16.
PHI35_MOE = ModelFigures("Phi-3.5-MoE", 4096, 6400, 4096 * 4096 * 2 + 4096 * 1024 * 2, 2)
# Qwen3-30B-A3B (Qwen/Qwen3-30B-A3B config.json): hidden 2048, expert FFN (moe_intermediate_size)
# 768, 32 q heads and 4 kv heads of head_dim 128 (q and o are 2048 x 4096, k and v 2048 x 512),
# top-8 of 128 routed experts, no shared expert. Expert 9.4 MB; attention 18.9 M parameters.
QWEN3_30B_A3B = ModelFigures("Qwen3-30B-A3B", 2048, 768, 2048 * 4096 * 2 + 2048 * 512 * 2, 8)
# GPT-OSS-20B (openai/gpt-oss-20b config.json): hidden 2880, expert FFN 2880, 64 q heads and 8 kv
# heads of head_dim 64 (q and o are 2880 x 4096, k and v 2880 x 512), top-4 of 32 experts. The
# checkpoint ships MXFP4 experts; ExpertMap serves bf16 weights (quantized checkpoints are
# refused), so the figures are bf16: expert 49.8 MB (biases left out, < 0.1%).
GPT_OSS_20B = ModelFigures("GPT-OSS-20B", 2880, 2880, 2880 * 4096 * 2 + 2880 * 512 * 2, 4)
# DeepSeek-V2-Lite (deepseek-ai/DeepSeek-V2-Lite config.json): hidden 2048, expert FFN 1408, top-6
# of 64 routed experts plus 2 shared experts of the same size; multi-head latent attention with 16
# heads, no q LoRA: q_proj 2048 x 16*(128+64), kv_a_proj_with_mqa 2048 x (512+64), kv_b_proj
# 512 x 16*(128+128), o_proj 16*128 x 2048. Expert 17.3 MB; attention 13.8 M parameters.
DEEPSEEK_V2_LITE = ModelFigures(
    "DeepSeek-V2-Lite", 2048, 1408,
    2048 * 16 * 192 + 2048 * (512 + 64) + 512 * 16 * 256 + 16 * 128 * 2048, 6,
    shared_expert_params=2 * 3 * 2048 * 1408,
)  # fmt: skip


@dataclass(frozen=True)
class LinkProfile:
    name: str
    model: ModelFigures
    gpu: str
    hbm_bytes_per_s: float
    link: str
    link_bytes_per_s: float

    @property
    def copy_s(self) -> float:
        return self.model.expert_bytes / self.link_bytes_per_s

    @property
    def layer_s(self) -> float:
        return self.model.layer_read_bytes / self.hbm_bytes_per_s

    @property
    def ratio(self) -> float:
        return self.copy_s / self.layer_s


# Public figures: RTX 3090 GDDR6X 936 GB/s; RTX 4090 GDDR6X 1008 GB/s (both PCIe 4.0 x16 cards);
# H100 SXM HBM3 3.35 TB/s; PCIe 4.0 x16 32 GB/s and PCIe 5.0 x16 64 GB/s per direction
# (theoretical; pinned-memory copies reach ~80-90% of it). GH200 (NVIDIA Grace Hopper Superchip):
# the Hopper GPU's 96 GB HBM3 at 4 TB/s; NVLink-C2C between Grace and Hopper 900 GB/s total,
# 450 GB/s per direction, of which host-to-device copies measure about 350 GB/s (the figure used).
PROFILES: dict[str, LinkProfile] = {
    p.name: p
    for p in (
        LinkProfile("rtx3090-pcie4-mixtral", MIXTRAL_8X7B, "RTX 3090", 936 * GB, "PCIe 4.0 x16", 32 * GB),
        LinkProfile("h100-pcie5-mixtral", MIXTRAL_8X7B, "H100 SXM", 3350 * GB, "PCIe 5.0 x16", 64 * GB),
        LinkProfile("rtx3090-pcie4-qwen15moe", QWEN15_MOE, "RTX 3090", 936 * GB, "PCIe 4.0 x16", 32 * GB),
        LinkProfile("rtx3090-pcie4-phi35moe", PHI35_MOE, "RTX 3090", 936 * GB, "PCIe 4.0 x16", 32 * GB),
        LinkProfile("rtx4090-pcie4-qwen3-30b-a3b", QWEN3_30B_A3B, "RTX 4090", 1008 * GB, "PCIe 4.0 x16", 32 * GB),
        LinkProfile("rtx4090-pcie4-gpt-oss-20b", GPT_OSS_20B, "RTX 4090", 1008 * GB, "PCIe 4.0 x16", 32 * GB),
        LinkProfile("rtx3090-pcie4-deepseek-v2-lite", DEEPSEEK_V2_LITE, "RTX 3090", 936 * GB, "PCIe 4.0 x16", 32 * GB),
        LinkProfile("gh200-c2c-mixtral", MIXTRAL_8X7B, "GH200 (H100 96 GB)", 4000 * GB, "NVLink-C2C (measured H2D)", 350 * GB),
    )
}
DEFAULT_PROFILE = defaults.LINK
#: Link names that are not hardware profiles: no link delay (a test aid), real CUDA copies.
SPECIAL_LINKS = ("instant", "cuda")


class UnknownProfileError(ValueError):
    pass


def get_profile(name: str) -> LinkProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise UnknownProfileError(
            f"unknown link profile {name!r}; choose one of: {', '.join([*PROFILES, *SPECIAL_LINKS])} or ratio:R"
        ) from None


#: ``ratio:R``: an emulated link on which one expert copy takes R decode-layer times.
RATIO_PREFIX = "ratio:"


def parse_ratio(name: str) -> float:
    """R of a ``ratio:R`` link name; ValueError naming the bad value unless R is a finite number > 0."""
    text = name[len(RATIO_PREFIX) :].strip()
    try:
        ratio = float(text)
    except ValueError:
        raise UnknownProfileError(
            f"link {name!r}: {text!r} is not a number (ratio:R means one expert copy takes R decode-layer times, R > 0)"
        ) from None
    if not (math.isfinite(ratio) and ratio > 0):
        raise UnknownProfileError(f"link {name!r}: the ratio must be a finite number greater than 0, not {text!r}")
    return ratio


def link_config(name: str) -> LinkConfig:
    """The one parser of link names (CLI, Serve args, bench): a profile of ``PROFILES``,
    ``ratio:R`` (emulated, one expert copy = R decode-layer times), ``instant`` (no delay) or
    ``cuda`` (real copies). Raises ``UnknownProfileError`` (a ValueError) naming the bad value."""
    if name == "instant":
        return LinkConfig(mode="instant", profile="instant")
    if name == "cuda":
        return LinkConfig(mode="cuda", profile="cuda")
    if name.startswith(RATIO_PREFIX):
        return LinkConfig(mode="auto", profile=name, copy_layer_ratio=parse_ratio(name))
    return LinkConfig(mode="auto", profile=name, copy_layer_ratio=get_profile(name).ratio)


def table() -> str:
    rows = [
        "| profile | model | expert MB | GPU | link | copy ms | layer decode ms | ratio |",
        "| --- | --- | ---: | --- | --- | ---: | ---: | ---: |",
    ]
    for p in PROFILES.values():
        rows.append(
            f"| {p.name} | {p.model.name} | {p.model.expert_bytes / 1e6:.0f} | {p.gpu} | {p.link} | "
            f"{p.copy_s * 1e3:.2f} | {p.layer_s * 1e3:.3f} | {p.ratio:.1f} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
