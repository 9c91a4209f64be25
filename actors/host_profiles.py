"""Host profiles: how long the host CPU takes to compute one expert from host memory.

A miss computed on the host (``--miss host|auto``, actors/host_compute.py) sends the tokens'
activations over the link (a few KiB per token), computes the expert on the CPU with the host
copy of its weights, and sends the result back. Like a link profile, a host profile is kept as
the ratio that matters, applied to the small model's measured decode-layer time:

    decode ratio = (one expert's host compute for one decode token) / (one decoder layer's decode time)

The host is a roofline: it streams the expert's weights from DRAM once per call (memory-bound:
bytes / memory bandwidth) and does 2 flops per weight per token (compute-bound: 2 x params x
tokens / flops). The two are equal at the crossover

    crossover tokens = flops / memory bandwidth x (bytes per weight / 2)

so a decode token (1 token) is memory-bound and costs ``decode ratio`` layer times, and T tokens
cost ``decode ratio x max(1, T / crossover)`` (a long prefill is compute-bound and should copy).
The activations' round trip over PCIe (latency-dominated, ~10 us each way) is added.

The stages of one node share its memory bandwidth and cores: a pipeline of N stages on one
host gives each 1/N of both (``HostProfile.share``), so each stage's host is N times slower.

The decode-layer time is the link profile's (the GPU's HBM reading a layer's attention and top-k
experts, actors/link_profiles.py), so the host ratio and the link ratio have the same unit; a
link given as ``ratio:R`` uses the default link profile's GPU and model.

| profile | CPU | memory | effective GB/s | effective TFLOPS | crossover tokens | decode ratio (Mixtral, RTX 3090) |
(the table is printed by ``python -m expertmap.actors.host_profiles``)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from expertmap.actors import defaults
from expertmap.actors.config import HostConfig
from expertmap.actors.link_profiles import PROFILES as LINK_PROFILES
from expertmap.actors.link_profiles import LinkProfile, ModelFigures

GB = 1e9
TFLOPS = 1e12
#: One way of the activations over PCIe for a handful of tokens: latency-bound (~10 us per transfer).
PCIE_ONE_WAY_S = 10e-6


@dataclass(frozen=True)
class HostProfile:
    name: str
    cpu: str
    memory: str
    memory_bytes_per_s: float  # effective (stream-like) bandwidth, all channels
    flops_per_s: float  # effective bf16 matrix throughput of all cores
    round_trip_s: float = 2 * PCIE_ONE_WAY_S

    def share(self, stages: int) -> HostProfile:
        """This host as one of ``stages`` pipeline stages on the node sees it: 1/stages of both."""
        if stages < 1:
            raise ValueError(f"stages per node {stages} must be at least 1")
        return HostProfile(f"{self.name}/{stages}" if stages > 1 else self.name, self.cpu, self.memory,
                           self.memory_bytes_per_s / stages, self.flops_per_s / stages, self.round_trip_s)  # fmt: skip

    def expert_s(self, model: ModelFigures, tokens: int = 1) -> float:
        """Seconds to compute one expert of ``model`` for ``tokens`` tokens on this host."""
        memory = model.expert_bytes / self.memory_bytes_per_s
        compute = 2 * 3 * model.hidden * model.expert_intermediate * tokens / self.flops_per_s
        return max(memory, compute) + self.round_trip_s

    def crossover_tokens(self, bytes_per_param: int = 2) -> float:
        return self.flops_per_s / self.memory_bytes_per_s * bytes_per_param / 2

    def decode_ratio(self, link: LinkProfile) -> float:
        """One expert, one decode token, in units of ``link``'s decode-layer time."""
        return self.expert_s(link.model, 1) / link.layer_s


# Public figures. Desktop: AMD Ryzen 9 7950X, 16 Zen 4 cores, AVX-512 (with BF16 dot products) on
# 256-bit datapaths: 64 bf16 flops/cycle/core x 16 x ~5 GHz = 5.1 TFLOPS peak, ~1.5 effective in
# GEMM; dual-channel DDR5-6000: 96 GB/s theoretical, ~60 GB/s measured (stream). Server: Intel Xeon
# Platinum 8480+, 56 cores, two 512-bit FMA units: 128 bf16 flops/cycle/core x 56 x 2.0 GHz = 14.3
# TFLOPS peak with AVX-512 (AMX would be more), ~5 effective; 8-channel DDR5-4800: 307 GB/s
# theoretical, ~250 GB/s measured. EPYC 9654 (Genoa), 96 Zen 4 cores, 12-channel DDR5-4800: 461 GB/s
# theoretical, ~370 GB/s measured; 96 x 64 x 3.5 GHz = 21.5 TFLOPS peak, ~7 effective.
PROFILES: dict[str, HostProfile] = {
    p.name: p
    for p in (
        HostProfile("desktop-ddr5", "Ryzen 9 7950X (16 cores, AVX-512 BF16)", "2-channel DDR5-6000", 60 * GB, 1.5 * TFLOPS),
        HostProfile("server-ddr5-8ch", "Xeon Platinum 8480+ (56 cores, AVX-512 BF16)", "8-channel DDR5-4800", 250 * GB, 5 * TFLOPS),
        HostProfile("server-ddr5-12ch", "EPYC 9654 (96 cores, AVX-512 BF16)", "12-channel DDR5-4800", 370 * GB, 7 * TFLOPS),
    )
}
DEFAULT_PROFILE = defaults.HOST
#: ``ratio:R``: one expert's host compute for one decode token takes R decode-layer times; the
#: crossover to compute-bound is the default profile's.
RATIO_PREFIX = "ratio:"


class UnknownHostProfileError(ValueError):
    pass


def get_profile(name: str) -> HostProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise UnknownHostProfileError(f"unknown host profile {name!r}; choose one of: {', '.join(PROFILES)} or ratio:R") from None


def _reference_link(link: str | None) -> LinkProfile:
    """The link profile whose GPU layer time is the unit (``ratio:R``, instant, cuda: the default one)."""
    return LINK_PROFILES.get(link or "", LINK_PROFILES[defaults.LINK])


def host_config(name: str, link: str | None = None, stages_per_node: int | None = None) -> HostConfig:
    """The one parser of host names (CLI, Serve args, bench): a profile of ``PROFILES`` or
    ``ratio:R``. ``link`` names the link profile whose decode-layer time is the unit. Raises
    ``UnknownHostProfileError`` (a ValueError) naming the bad value."""
    default_crossover = PROFILES[DEFAULT_PROFILE].crossover_tokens()
    if name.startswith(RATIO_PREFIX):
        text = name[len(RATIO_PREFIX) :].strip()
        try:
            ratio = float(text)
        except ValueError:
            raise UnknownHostProfileError(
                f"host {name!r}: {text!r} is not a number (ratio:R means one expert's host compute for one "
                "decode token takes R decode-layer times, R > 0)"
            ) from None
        if not (math.isfinite(ratio) and ratio > 0):
            raise UnknownHostProfileError(f"host {name!r}: the ratio must be a finite number greater than 0, not {text!r}")
        return HostConfig(profile=name, decode_ratio=ratio, crossover_tokens=default_crossover, stages_per_node=stages_per_node)
    p = get_profile(name)
    return HostConfig(profile=name, decode_ratio=p.decode_ratio(_reference_link(link)),
                      crossover_tokens=p.crossover_tokens(), stages_per_node=stages_per_node)  # fmt: skip


def resolve(host: HostConfig, link: str | None, stages: int = 1) -> HostConfig:
    """``host`` with its ratios filled in (from its profile when unset) and divided among the
    stages sharing the node (``host.stages_per_node``, else ``stages``): each gets 1/N of the
    bandwidth and the cores, so its decode ratio is N times larger."""
    if host.decode_ratio is None or host.crossover_tokens is None:
        parsed = host_config(host.profile, link)
        host = host.model_copy(update={"decode_ratio": host.decode_ratio or parsed.decode_ratio,
                                       "crossover_tokens": host.crossover_tokens or parsed.crossover_tokens})  # fmt: skip
    n = host.stages_per_node or stages
    if n < 1:
        raise ValueError(f"stages per node {n} must be at least 1")
    return host.model_copy(update={"decode_ratio": host.decode_ratio * n, "stages_per_node": n})


def table(link: str = defaults.LINK) -> str:
    ref = LINK_PROFILES[link]
    rows = [
        (f"| profile | CPU | memory | GB/s | TFLOPS | crossover tokens | expert ms ({ref.model.name}, 1 token) | "
        f"decode ratio (layer of {ref.gpu}) | link ratio |"),
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for p in PROFILES.values():
        rows.append(
            f"| {p.name} | {p.cpu} | {p.memory} | {p.memory_bytes_per_s / GB:.0f} | {p.flops_per_s / TFLOPS:.1f} | "
            f"{p.crossover_tokens():.0f} | {p.expert_s(ref.model) * 1e3:.2f} | {p.decode_ratio(ref):.2f} | {ref.ratio:.1f} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
