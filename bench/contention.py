"""The pipeline under CPU contention: does it keep finishing requests while other processes hog the cores?

    python -m expertmap.bench.contention --workload dev_mix.jsonl --gpus 6 --clients 16 --spinners 2 \\
        --out bench/results/contention

Starts ``--spinners`` processes that each spin on a core (a busy loop, at the same priority),
then drives the Ray pipeline (``--gpus`` stages, declared GPUs on this CPU) with ``--clients``
closed-loop clients over ``--prompts`` evaluation prompts, the map store warmed from
``--warm-limit`` prompts recorded before the spinners start. Reports the longest time in which no
request got a token (a stalled pipeline shows there), the longest time without a request ending
(closed-loop clients with equal-length requests finish in waves, so this one is long by design), the watchdog's stall
count, tokens/s and whether every request's tokens equal the in-process engine's; results.json,
results.md and ``completions.png`` (requests done against time).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
from pathlib import Path

from expertmap.actors import defaults
from expertmap.actors.config import Budget, EngineConfig, LinkConfig
from expertmap.actors.engine import OffloadEngine
from expertmap.actors.link_profiles import link_config
from expertmap.actors.sampling import SamplingParams
from expertmap.actors.trace_recorder import TraceRecorder
from expertmap.bench.paths import recorded
from expertmap.bench.pipeline_bench import (add_workload_and_model, drive, engine_drive, prompt_ids, stage_totals,
                                             start_local_ray, warm_entries, warmed_store)
from expertmap.bench.plotting import pyplot, save
from expertmap.cluster.workload import load_workload, split

logger = logging.getLogger(__name__)


def _spin() -> None:
    while True:
        pass


def start_spinners(n: int) -> list[multiprocessing.Process]:
    procs = [multiprocessing.get_context("spawn").Process(target=_spin, daemon=True, name=f"spinner-{i}") for i in range(n)]
    for p in procs:
        p.start()
    return procs


def run(args) -> dict:
    import ray

    from expertmap.cluster.pipeline import Pipeline, PipelineConfig
    from expertmap.predictor.policies import PolicyInputs
    from expertmap.predictor.replica import StoreReplica

    warm, evals = split(load_workload(args.workload), 0.7, args.seed)
    warm, evals = warm[: args.warm_limit], evals[: args.prompts]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, do_sample=True, seed=args.seed)
    recorder = TraceRecorder(args.model, "cpu")
    prompts = prompt_ids(recorder.engine.tokenizer, evals)
    entries = warm_entries(recorder.record_all(warm, args.max_new_tokens, do_sample=True, seed=args.seed, desc="warm-up"))
    recorder.close()
    budget = Budget.parse(args.budget)
    emulated = link_config(args.link)

    # the reference tokens: the in-process engine, the same prompts one at a time, no contention
    store = warmed_store(args.model, entries)
    engine = OffloadEngine(EngineConfig(model=args.model, policy=args.policy, budget=budget, link=emulated),
                           PolicyInputs(replica=StoreReplica(store)))  # fmt: skip
    reference = engine_drive(engine, prompts, params)
    bandwidth = engine.bandwidth
    engine.close()

    start_local_ray(args.gpus)
    link = LinkConfig(bandwidth_bytes_per_s=bandwidth, profile=args.link)
    cfg = EngineConfig(model=args.model, policy=args.policy, budget=budget, link=link)
    pipe = Pipeline(PipelineConfig(engine=cfg, gpus=args.gpus, map_service_name="contention"))
    spinners = []
    try:
        ray.get(pipe.map_service.add_many.remote(entries))
        pipe.reset_stats()
        spinners = start_spinners(args.spinners)
        r = drive(pipe, prompts, params, args.clients, desc=f"N={args.gpus} c={args.clients}, {args.spinners} spinners")
        stages = pipe.stats()
        stalls = pipe.scheduler.stalls
        deadline = pipe.scheduler.stall_deadline_s
    finally:
        for p in spinners:
            p.terminate()
        pipe.close()
        ray.kill(pipe.map_service)
    return {
        "config": {"model": recorded(args.model), "workload": recorded(args.workload), "prompts": len(prompts),
                   "warm_prompts": len(warm), "max_new_tokens": args.max_new_tokens, "policy": args.policy,
                   "budget": args.budget, "link": args.link, "gpus": args.gpus, "clients": args.clients,
                   "spinners": args.spinners},
        "tokens_per_s": r["tokens_per_s"], "wall_s": r["wall_s"], "ttft_s": r["ttft_s"], "tpot_s": r["tpot_s"],
        "max_completion_gap_s": r["max_completion_gap_s"], "max_token_gap_s": r["max_token_gap_s"],
        "completed_s": r["completed_s"],
        "watchdog_stalls": stalls, "watchdog_deadline_s": deadline,
        "tokens_equal_engine": r["outputs"] == reference["outputs"],
        "engine_tokens_per_s_uncontended": reference["tokens_per_s"],
        **stage_totals(stages), "stages": stages,
    }  # fmt: skip


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    c = results["config"]
    gaps = sorted(b - a for a, b in zip([0.0, *results["completed_s"]], results["completed_s"]))
    lines = [
        "# The pipeline under CPU contention",
        "",
        f"{c['gpus']} stages, {c['clients']} closed-loop clients, {c['prompts']} prompts of `{c['workload']}` x "
        f"{c['max_new_tokens']} tokens, policy `{c['policy']}` (store warmed from {c['warm_prompts']} prompts), budget "
        f"{c['budget']}, link `{c['link']}`, while {c['spinners']} other processes spin on the cores.",
        "",
        "| longest time with no token produced s | longest gap between completions s | next longest s | wall s | tokens/s | TTFT p50 / p99 s | TPOT p50 / p99 ms | watchdog stalls (deadline s) | tokens = engine |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: |",
        f"| {results['max_token_gap_s']:.1f} | {results['max_completion_gap_s']:.1f} | {gaps[-2] if len(gaps) > 1 else 0:.1f} | {results['wall_s']:.0f} | "
        f"{results['tokens_per_s']:.1f} | {results['ttft_s']['p50']:.1f} / {results['ttft_s']['p99']:.1f} | "
        f"{results['tpot_s']['p50'] * 1e3:.0f} / {results['tpot_s']['p99'] * 1e3:.0f} | "
        f"{results['watchdog_stalls']} ({results['watchdog_deadline_s'] or 0:.1f}) | "
        f"{'yes' if results['tokens_equal_engine'] else 'NO'} |",
        "",
        "![requests done against time](completions.png)",
        "",
    ]
    (out / "results.md").write_text("\n".join(lines))

    plt = pyplot()

    t = results["completed_s"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.step([0.0, *t], range(len(t) + 1), where="post")
    ax.set_xlabel("seconds since the first request")
    ax.set_ylabel("requests done")
    ax.set_title(f"N={c['gpus']}, {c['clients']} clients, {c['spinners']} spinning processes")
    ax.grid(alpha=0.3)
    save(fig, out / "completions.png")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_and_model(ap)
    ap.add_argument("--gpus", type=int, default=6, help="pipeline stages (declared GPUs; default 6)")
    ap.add_argument("--clients", type=int, default=16, help="closed-loop clients (default 16)")
    ap.add_argument("--spinners", type=int, default=2, help="processes spinning on the cores meanwhile (default 2)")
    ap.add_argument("--prompts", type=int, default=32, help="evaluation prompts (default 32)")
    ap.add_argument("--warm-limit", type=int, default=40, help="warm-up prompts for the map store (default 40)")
    ap.add_argument("--max-new-tokens", type=int, default=16, help="new tokens per request (default 16)")
    ap.add_argument("--policy", default="finemoe", help="cache policy (default finemoe, as in the stall that was seen)")
    ap.add_argument("--budget", default=defaults.BUDGET, help=f"budget per stage (default {defaults.BUDGET})")
    ap.add_argument("--link", default=defaults.LINK, help=f"emulated link profile (default {defaults.LINK})")
    ap.add_argument("--seed", type=int, default=0, help="seed of the split and the sampling (default 0)")
    ap.add_argument("--out", type=Path, required=True, help="folder for results.json, results.md, completions.png")
    args = ap.parse_args(argv)
    for name in ("gpus", "clients", "prompts", "warm_limit", "max_new_tokens"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} {getattr(args, name)} must be at least 1")
    if args.spinners < 0:
        ap.error(f"--spinners {args.spinners} must be 0 or more")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    results = run(args)
    write(results, args.out)
    print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
