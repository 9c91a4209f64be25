"""Scaling benchmark: the Ray pipeline on N stages (default 1 and 6) at several client
concurrencies (default 1, 4, 8, 16, 32), with an emulated and an instant link, against the
in-process engine on the same prompts.

    python -m expertmap.bench.scaling --out bench/results/scaling [--workload FILE]

For every (link, N, clients): tokens/s (and against one client), the requests per micro-batch and
the micro-batches in flight the scheduler chose, TTFT and TPOT percentiles, hit rate (all stages,
and per stage), each stage's busy fraction, and whether the tokens equal the engine's. The policy
is `hybrid` with its map store warmed from the warm split; each stage has the budget fraction of
its own experts and its own emulated link (the profile's copy/layer ratio on the measured layer
time). Writes results.json, results.md and scaling.png (tokens/s and hit rate against clients).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from expertmap.actors.config import Budget, EngineConfig, LinkConfig
from expertmap.actors.engine import OffloadEngine
from expertmap.actors.sampling import SamplingParams
from expertmap.actors import defaults
from expertmap.actors.link_profiles import link_config
from expertmap.bench.paths import recorded
from expertmap.bench.pipeline_bench import (add_workload_and_model, drive, engine_drive, prompt_ids, stage_totals,
                                             start_local_ray, warm_entries, warmed_store)
from expertmap.actors.trace_recorder import TraceRecorder
from expertmap.bench.plotting import pyplot, save
from expertmap.cluster.workload import load_workload, split

logger = logging.getLogger(__name__)


def run(args) -> dict:
    import ray

    from expertmap.cluster.pipeline import Pipeline, PipelineConfig

    emulated = link_config(args.link)
    if emulated.copy_layer_ratio is None:  # instant or cuda: there is no emulated link to compare
        raise ValueError(f"--link {args.link!r}: the scaling run needs an emulated link (a link profile or ratio:R)")
    warm, evals = split(load_workload(args.workload), 0.7, args.seed)
    warm, evals = warm[: args.warm_limit], evals[: args.limit]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, do_sample=True, seed=args.seed)
    recorder = TraceRecorder(args.model, "cpu")
    tokenizer = recorder.engine.tokenizer
    prompts = prompt_ids(tokenizer, evals)
    entries = warm_entries(recorder.record_all(warm, args.max_new_tokens, do_sample=True, seed=args.seed, desc="warm-up"))
    recorder.close()
    budget = Budget.parse(args.budget)
    instant = link_config("instant")
    results: dict = {"runs": [], "engine": {}}

    # the in-process engine: the same prompts one after the other (map store warmed the same way)
    for label, link in (("emulated", emulated), ("instant", instant)):
        from expertmap.predictor.policies import PolicyInputs
        from expertmap.predictor.replica import StoreReplica

        store = warmed_store(args.model, entries)
        engine = OffloadEngine(EngineConfig(model=args.model, policy=args.policy, budget=budget, link=link),
                               PolicyInputs(replica=StoreReplica(store)))  # fmt: skip
        r = engine_drive(engine, prompts, params)
        r["hit_rate"] = engine.stats.hit_rate
        r["layer_time_s"] = engine.layer_time_s
        r["bandwidth"] = engine.bandwidth
        engine.close()
        results["engine"][label] = {k: v for k, v in r.items() if k != "outputs"}
        results["engine"][label]["_outputs"] = r["outputs"]
        logger.warning("engine (%s link): %.1f tokens/s, hit rate %.3f", label, r["tokens_per_s"], r["hit_rate"])

    start_local_ray(max(args.gpus))
    layer_time = results["engine"]["emulated"]["layer_time_s"]
    plan = [(n, c, label) for label in args.links for n in args.gpus for c in args.concurrency]
    for n, c, label in plan:
        link = instant
        if label == "emulated":  # every stage's link: the engine's (the ratio on one measured layer time)
            link = LinkConfig(bandwidth_bytes_per_s=results["engine"]["emulated"]["bandwidth"], profile=args.link)
        engine_cfg = EngineConfig(model=args.model, policy=args.policy, budget=budget, link=link)
        pipe = Pipeline(PipelineConfig(engine=engine_cfg, gpus=n, map_service_name=f"scaling-{n}-{c}-{label}"))
        try:
            ray.get(pipe.map_service.add_many.remote(entries))
            pipe.reset_stats()
            launched, inflight = pipe.scheduler.microbatches, pipe.scheduler.inflight_at_launch
            r = drive(pipe, prompts, params, c, desc=f"N={n} c={c} {label}")
            stages = pipe.stats()
            r["microbatches"] = pipe.scheduler.microbatches - launched
            r["mean_microbatch"] = stages[0]["steps"] / max(1, r["microbatches"])  # requests per micro-batch
            r["mean_inflight"] = (pipe.scheduler.inflight_at_launch - inflight) / max(1, r["microbatches"])
        finally:
            pipe.close()
            ray.kill(pipe.map_service)
        same = r["outputs"] == results["engine"][label]["_outputs"]
        row = {"gpus": n, "concurrency": c, "link": label, **{k: v for k, v in r.items() if k != "outputs"},
               **stage_totals(stages), "stages": stages, "tokens_equal_engine": same,
               "stage_layer_time_s": pipe.layer_time_s}  # fmt: skip
        results["runs"].append(row)
        logger.warning("N=%d c=%d %s: %.1f tok/s, hit %.3f, per stage %s, busy %s, same tokens %s", n, c, label,
                       row["tokens_per_s"], row["hit_rate"], [round(s["hit_rate"], 3) for s in stages],
                       [round(s["busy_frac"], 2) for s in stages], same)  # fmt: skip
    for e in results["engine"].values():
        e.pop("_outputs")
    results["config"] = {
        "model": recorded(args.model), "workload": recorded(args.workload), "prompts": len(prompts), "warm_prompts": len(warm),
        "max_new_tokens": args.max_new_tokens, "decoding": "seeded sampling", "policy": args.policy,
        "budget": args.budget, "link": args.link, "copy_layer_ratio": emulated.copy_layer_ratio, "engine_layer_time_s": layer_time,
    }  # fmt: skip
    return results


def _per_stage(run: dict, key: str) -> str:
    return " / ".join(f"{s[key]:.2f}" for s in run["stages"])


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    cfg = results["config"]
    e = results["engine"]
    lines = [
        "# Scaling: the Ray pipeline on N stages",
        "",
        f"{cfg['prompts']} prompts of `{cfg['workload']}` (eval split), {cfg['max_new_tokens']} new tokens, "
        f"{cfg['decoding']}, policy `{cfg['policy']}` (store warmed from {cfg['warm_prompts']} prompts), budget "
        f"{cfg['budget']} of each stage's experts, link `{cfg['link']}` (ratio {cfg['copy_layer_ratio']:.1f}) per stage. "
        "Machine: 2 CPU cores, stages on declared GPUs.",
        "",
        f"In-process engine, same prompts one at a time: {e['emulated']['tokens_per_s']:.1f} tokens/s "
        f"(hit rate {e['emulated']['hit_rate']:.3f}) with the emulated link, {e['instant']['tokens_per_s']:.1f} "
        "tokens/s with an instant link.",
        "",
        "| N | clients | link | tokens/s | vs 1 client | vs engine | requests per micro-batch | micro-batches in flight | TTFT p50 s | TTFT p99 s | TPOT p50 ms | TPOT p99 ms | hit rate | per-stage hit rate | per-stage busy | tokens = engine |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | :---: |",
    ]
    for r in results["runs"]:
        base = e[r["link"]]["tokens_per_s"]
        one = [q for q in results["runs"] if (q["gpus"], q["link"], q["concurrency"]) == (r["gpus"], r["link"], 1)]
        vs_one = f"{r['tokens_per_s'] / one[0]['tokens_per_s']:.2f}x" if one else "-"
        lines.append(
            f"| {r['gpus']} | {r['concurrency']} | {r['link']} | {r['tokens_per_s']:.1f} | {vs_one} | {r['tokens_per_s'] / base:.2f}x | "
            f"{r['mean_microbatch']:.1f} | {r['mean_inflight']:.1f} | "
            f"{r['ttft_s']['p50']:.2f} | {r['ttft_s']['p99']:.2f} | {r['tpot_s']['p50'] * 1e3:.0f} | "
            f"{r['tpot_s']['p99'] * 1e3:.0f} | {r['hit_rate']:.3f} | "
            f"{_per_stage(r, 'hit_rate')} | {_per_stage(r, 'busy_frac')} | {'yes' if r['tokens_equal_engine'] else 'NO'} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")

    plt = pyplot()

    links = sorted({r["link"] for r in results["runs"]})
    fig, axes = plt.subplots(1, len(links) + 1, figsize=(4.2 * (len(links) + 1), 3.6), squeeze=False)
    axes = axes[0]
    for ax, link in zip(axes, links):  # tokens/s against clients, one line per stage count
        runs = [r for r in results["runs"] if r["link"] == link]
        for n in sorted({r["gpus"] for r in runs}):
            pts = sorted((r["concurrency"], r["tokens_per_s"]) for r in runs if r["gpus"] == n)
            ax.plot([c for c, _ in pts], [t for _, t in pts], "o-", label=f"N = {n}")
        ax.axhline(e[link]["tokens_per_s"], color="grey", ls="--", label="engine, one at a time")
        ax.set_title(f"tokens/s, {link} link")
    runs = [r for r in results["runs"] if r["link"] == links[0]]
    for n in sorted({r["gpus"] for r in runs}):
        pts = sorted((r["concurrency"], r["hit_rate"]) for r in runs if r["gpus"] == n)
        axes[-1].plot([c for c, _ in pts], [h for _, h in pts], "o-", label=f"N = {n}")
    axes[-1].set_title(f"hit rate (all stages), {links[0]} link")
    for ax in axes:
        ax.set_xlabel("clients (closed loop)")
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=7)
    save(fig, out / "scaling.png")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_and_model(ap)
    ap.add_argument("--out", type=Path, default=Path("bench/results/scaling"), help="folder for results.json, results.md, scaling.png")
    ap.add_argument("--gpus", type=lambda s: [int(x) for x in s.split(",")], default=[1, 6],
                    help="comma-separated stage counts (default 1,6)")
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 8, 16, 32],
                    help="comma-separated numbers of clients in a closed loop (default 1,4,8,16,32)")
    ap.add_argument("--limit", type=int, default=64, help="evaluation prompts (default 64)")
    ap.add_argument("--warm-limit", type=int, default=100, help="prompts that warm the map store (default 100)")
    ap.add_argument("--max-new-tokens", type=int, default=16, help="new tokens per request (default 16)")
    ap.add_argument("--policy", default=defaults.SERVE_POLICY, help=f"cache policy (default {defaults.SERVE_POLICY})")
    ap.add_argument("--budget", default=defaults.BUDGET, help=f"fraction of each stage's expert bytes (default {defaults.BUDGET})")
    ap.add_argument("--link", default=defaults.LINK, help=f"emulated link: a profile or ratio:R (default {defaults.LINK})")
    ap.add_argument("--links", type=lambda s: s.split(","), default=["emulated", "instant"],
                    help="comma-separated: emulated (the --link profile) and/or instant (default both)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    args = ap.parse_args(argv)
    if not args.links or set(args.links) - {"emulated", "instant"}:
        ap.error(f"--links {','.join(args.links)}: name emulated and/or instant")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    results = run(args)
    results["config"]["wall_s"] = time.perf_counter() - t0
    write(results, args.out)
    print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
