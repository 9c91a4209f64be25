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

    @property
    def expert_bytes(self) -> int:
        return 3 * self.hidden * self.expert_intermediate * self.bytes_per_param

    @property
    def layer_read_bytes(self) -> int:
        return self.attention_params * self.bytes_per_param + self.top_k * self.expert_bytes


# Mixtral-8x7B: hidden 4096, expert FFN 14336, 32 q heads x 128, 8 kv heads x 128, top-2.
MIXTRAL_8X7B = ModelFigures("Mixtral-8x7B", 4096, 14336, 4096 * 4096 * 2 + 4096 * 1024 * 2, 2)
# Qwen1.5-MoE-A2.7B: hidden 2048, expert FFN 1408, 16 heads x 128 (MHA), top-4 of 60 routed.
QWEN15_MOE = ModelFigures("Qwen1.5-MoE-A2.7B", 2048, 1408, 2048 * 2048 * 4, 4)
# Phi-3.5-MoE: hidden 4096, expert FFN 6400, 32 q heads, 8 kv heads x 128, top-2 of 16.
PHI35_MOE = ModelFigures("Phi-3.5-MoE", 4096, 6400, 4096 * 4096 * 2 + 4096 * 1024 * 2, 2)


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


# Public figures: RTX 3090 GDDR6X 936 GB/s; H100 SXM HBM3 3.35 TB/s; PCIe 4.0 x16 32 GB/s and
# PCIe 5.0 x16 64 GB/s per direction (theoretical; pinned-memory copies reach ~80-90% of it).
PROFILES: dict[str, LinkProfile] = {
    p.name: p
    for p in (
        LinkProfile("rtx3090-pcie4-mixtral", MIXTRAL_8X7B, "RTX 3090", 936 * GB, "PCIe 4.0 x16", 32 * GB),
        LinkProfile("h100-pcie5-mixtral", MIXTRAL_8X7B, "H100 SXM", 3350 * GB, "PCIe 5.0 x16", 64 * GB),
        LinkProfile("rtx3090-pcie4-qwen15moe", QWEN15_MOE, "RTX 3090", 936 * GB, "PCIe 4.0 x16", 32 * GB),
        LinkProfile("rtx3090-pcie4-phi35moe", PHI35_MOE, "RTX 3090", 936 * GB, "PCIe 4.0 x16", 32 * GB),
    )
}
DEFAULT_PROFILE = LinkConfig().profile  # the default is defined once, on LinkConfig
#: Link names that are not hardware profiles: no link delay (a test aid), real CUDA copies.
SPECIAL_LINKS = ("instant", "cuda")


class UnknownProfileError(ValueError):
    pass


def get_profile(name: str) -> LinkProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise UnknownProfileError(
            f"unknown link profile {name!r}; choose one of: {', '.join([*PROFILES, *SPECIAL_LINKS])}"
        ) from None


def link_config(name: str) -> LinkConfig:
    """The one parser of link names (CLI, Serve args, bench): a profile of ``PROFILES``,
    ``instant`` (no delay) or ``cuda`` (real copies). Raises ``UnknownProfileError`` (a ValueError)."""
    if name == "instant":
        return LinkConfig(mode="instant", profile="instant")
    if name == "cuda":
        return LinkConfig(mode="cuda", profile="cuda")
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
