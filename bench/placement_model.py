"""Layers per GPU (ExpertMap's pipeline) or experts per GPU (expert parallelism, what FineMoE's
and MoE-Infinity's multi-GPU runs do): decode time and throughput on paper, from the link profiles.

    python -m expertmap.bench.placement_model            # writes bench/results/placement.md

Both placements hold the same expert bytes per GPU (the budget) and give each GPU its own PCIe
link; what differs is who waits for whom, per decode iteration of L MoE layers (miss rate m,
top-k experts per token, one expert copy t_c, one layer's decode t_l from the profile):

- layers per GPU (pipeline, N stages): a request crosses the stages one after another; each
  layer waits for its own misses on its own stage's link, one copy after another:
      TPOT = L (t_l + m k t_c) + (N - 1) t_hop
  With N or more requests in flight every stage works on a different one, so the pipeline
  completes N iterations per TPOT:  throughput = N / TPOT.
- experts per GPU (expert parallel): every GPU takes part in every layer; a layer's k experts
  fall on GPUs at random and their misses copy in parallel, so a layer waits for the busiest
  link: E[max over GPUs of misses there] x t_c; each MoE layer adds two all-to-alls (dispatch,
  combine) of t_a:
      TPOT = L (t_l + E[max misses per GPU] t_c + 2 t_a)
  Throughput: the N links are shared by every request: at best N / (L m k t_c) tokens/s, the same
  link-bound ceiling the pipeline reaches once N requests are in flight.

t_hop (activations of one token to the next stage, 2 x hidden bytes over PCIe, latency-bound)
and t_a (an all-to-all among N PCIe GPUs without NVLink) are small latencies: 15 us and 30 us
here (order of magnitude of NCCL small-message latency on PCIe; NVLink systems are lower).
"""

from __future__ import annotations

import itertools
from pathlib import Path

from expertmap.actors.link_profiles import PROFILES, LinkProfile

T_HOP_S = 15e-6
T_A2A_S = 30e-6
L_MIXTRAL = 32


def expected_max_misses(k: int, n: int, m: float) -> float:
    """E[max over n GPUs of the misses that land there], k experts placed uniformly, each a miss with prob m."""
    total = 0.0
    for gpus in itertools.product(range(n), repeat=k):
        for missed in itertools.product((0, 1), repeat=k):
            p = (1 / n) ** k
            for x in missed:
                p *= m if x else 1 - m
            load = [0] * n
            for g, x in zip(gpus, missed):
                load[g] += x
            total += p * max(load)
    return total


def compare(profile: LinkProfile, n: int, hit_rate: float, layers: int = L_MIXTRAL) -> dict:
    m, k = 1 - hit_rate, profile.model.top_k
    t_c, t_l = profile.copy_s, profile.layer_s
    pipe_tpot = layers * (t_l + m * k * t_c) + (n - 1) * T_HOP_S
    ep_tpot = layers * (t_l + expected_max_misses(k, n, m) * t_c + 2 * T_A2A_S)
    return {
        "profile": profile.name, "gpus": n, "hit_rate": hit_rate,
        "pipeline_tpot_ms": pipe_tpot * 1e3, "pipeline_tokens_per_s_full": n / pipe_tpot,
        "expert_parallel_tpot_ms": ep_tpot * 1e3,
        # either placement, any batching: n links, m k copies per layer per token
        "link_ceiling_tokens_per_s": n / (layers * m * k * t_c),
        "single_request_speedup_ep": pipe_tpot / ep_tpot,
    }  # fmt: skip


def table(hit_rates=(0.376, 0.445), gpus=(1, 2, 3, 6)) -> str:
    lines = [
        "| profile | GPUs | hit rate | pipeline TPOT ms | expert-parallel TPOT ms | EP faster for one request | "
        "pipeline tokens/s, N+ requests | link-bound ceiling tokens/s (both) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in ("rtx3090-pcie4-mixtral", "h100-pcie5-mixtral"):
        for h in hit_rates:
            for n in gpus:
                r = compare(PROFILES[name], n, h)
                lines.append(
                    f"| {name} | {n} | {h:.3f} | {r['pipeline_tpot_ms']:.1f} | {r['expert_parallel_tpot_ms']:.1f} | "
                    f"{r['single_request_speedup_ep']:.2f}x | {r['pipeline_tokens_per_s_full']:.1f} | "
                    f"{r['link_ceiling_tokens_per_s']:.1f} |"
                )
    return "\n".join(lines)


def main() -> int:
    out = Path("bench/results/placement.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    text = (
        "# Layers per GPU or experts per GPU (on paper)\n\n"
        "Mixtral-8x7B (32 MoE layers, top-2), hit rates measured on the bundled model at 25% budget "
        "(on-demand 0.376, hybrid 0.445; bench/results/dev_mix). Formulas: bench/placement_model.py.\n\n"
        + table() + "\n"
    )
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
