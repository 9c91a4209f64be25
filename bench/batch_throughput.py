"""Tokens/s of one shard runtime (all layers, one device) as the micro-batch grows: B requests
decoded together, one pass per layer, against B = 1. No Ray: this isolates the batched pass.

    python -m expertmap.bench.batch_throughput [--batches 1,4,8,16,32] [--links instant,rtx3090-pcie4-mixtral]

Each B runs B prompts of the bundled workload to ``--new-tokens`` greedy tokens in one
micro-batch per iteration (prefills together, then decodes), policy on-demand at budget 25%;
the configurations are interleaved over ``--repeats`` rounds and the median is kept (a shared
machine is noisy). Writes DIR/results.json and results.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from expertmap.actors.config import EngineConfig
from expertmap.actors.link_profiles import link_config
from expertmap.actors.shard import ShardRuntime
from expertmap.bench.batch_agreement import generate
from expertmap.bench.paths import DEFAULT_WORKLOAD, recorded
from expertmap.cluster.workload import load_workload


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default=str(DEFAULT_WORKLOAD), help="JSONL prompts (default: the bundled sample)")
    ap.add_argument("--batches", default="1,4,8,16,32", help="micro-batch sizes (comma list)")
    ap.add_argument("--links", default="instant,rtx3090-pcie4-mixtral", help="link names (comma list)")
    ap.add_argument("--policy", default="on-demand", help="cache policy")
    ap.add_argument("--budget", default="0.25", help="fraction of all expert bytes")
    ap.add_argument("--new-tokens", type=int, default=16, help="greedy tokens per request")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds (median kept)")
    ap.add_argument("--out", default="bench/results/batch_throughput", help="output folder")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    links = [x.strip() for x in args.links.split(",") if x.strip()]
    records = load_workload(Path(args.workload))
    results: dict = {"config": {**{k: v for k, v in vars(args).items() if k != "workload"},
                                "workload": recorded(args.workload)}, "rows": []}  # fmt: skip
    for link in links:
        runtime = ShardRuntime(EngineConfig(policy=args.policy, budget=args.budget, link=link_config(link)))
        tok = runtime.tokenizer
        prompts = [tok(r["prompt"]).input_ids[:64] or [tok.bos_token_id] for r in records[: max(batches)]]
        times: dict[int, list[float]] = {b: [] for b in batches}
        hit: dict[int, float] = {}
        for _ in range(args.repeats):
            for b in batches:
                runtime.reset()
                t0 = time.perf_counter()
                generate(runtime, prompts[:b], args.new_tokens, f"{link}-{b}-")
                times[b].append(time.perf_counter() - t0)
                hit[b] = runtime.cache.snapshot_stats().hit_rate
        runtime.close()
        base = None
        for b in batches:
            tps = b * args.new_tokens / statistics.median(times[b])
            base = base or tps
            results["rows"].append({"link": link, "batch": b, "tokens_per_s": tps, "vs_batch_1": tps / base,
                                    "hit_rate": hit[b], "seconds": times[b]})  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    lines = ["| link | micro-batch | tokens/s | vs 1 | hit rate |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['link']} | {r['batch']} | {r['tokens_per_s']:.1f} | {r['vs_batch_1']:.2f}x | {r['hit_rate']:.3f} |"
              for r in results["rows"]]  # fmt: skip
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
