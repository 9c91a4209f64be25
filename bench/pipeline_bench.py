"""Benchmarks of the Ray pipeline: ``expertmap bench --gpus N`` (policies on N stages) and the
scaling run (``python -m expertmap.bench.scaling``). Real stage actors, real time, the emulated link of a
link profile on every stage (each GPU has its own PCIe link), clients in a closed loop: each of
``concurrency`` clients sends its next prompt when its last one finished.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from expertmap.actors.config import Budget, EngineConfig, require_model_folder
from expertmap.actors.sampling import SamplingParams
from expertmap.actors import defaults
from expertmap.actors.link_profiles import link_config
from expertmap.bench.paths import DEFAULT_WORKLOAD, recorded
from expertmap.actors.trace_recorder import RequestTrace, TraceRecorder
from expertmap.bench.plotting import pyplot, save
from expertmap.cluster.workload import load_workload, split

logger = logging.getLogger(__name__)


def start_local_ray(gpus: int) -> None:
    """A local-only Ray with ``gpus`` declared GPUs (stages run on the CPU when there are none)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        have = ray.cluster_resources().get("GPU", 0)
        if have < gpus:
            raise ValueError(f"the running Ray has {have:g} GPUs, the benchmark needs {gpus}")
        return
    ray.init(num_gpus=gpus, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p99": 0.0}
    a = np.asarray(values)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99))}


def add_workload_and_model(ap) -> None:
    """The ``--workload`` and ``--model`` flags the pipeline benchmarks (scaling, contention) share."""
    ap.add_argument("--workload", type=Path, default=DEFAULT_WORKLOAD,
                    help="JSONL prompt workload, split 70:30 into warm-up and evaluation (default: the bundled sample)")
    ap.add_argument("--model", type=require_model_folder, default=defaults.BUNDLED_MODEL, help=defaults.MODEL_HELP)


def drive(pipe, prompts: list[list[int]], params: SamplingParams, concurrency: int, desc: str | None = None) -> dict:
    """Closed loop of ``concurrency`` clients over ``prompts``; latency and throughput figures."""
    todo = deque(enumerate(prompts))
    running: dict[int, object] = {}
    done: dict[int, object] = {}
    bar = tqdm(total=len(prompts), desc=desc, unit="req", leave=False, disable=desc is None)
    completed: list[float] = []  # seconds from the start at which each request ended
    t0 = time.perf_counter()
    while todo or running:
        while todo and len(running) < concurrency:
            i, p = todo.popleft()
            running[i] = pipe.submit(p, params)
        time.sleep(0.002)
        for i, r in list(running.items()):
            if r.done.is_set():
                done[i] = running.pop(i)
                completed.append(time.perf_counter() - t0)
                bar.update()
    wall = time.perf_counter() - t0
    bar.close()
    reqs = [done[i] for i in range(len(prompts))]
    failed = [r for r in reqs if r.error is not None]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(reqs)} requests failed, first: {failed[0].error}")
    tokens = sum(len(r.tokens) for r in reqs)
    return {
        "tokens_per_s": tokens / wall,
        "ttft_s": percentiles([r.ttft_s for r in reqs]),
        "tpot_s": percentiles([t for r in reqs for t in r.tpot_s]),
        "wall_s": wall,
        "tokens": tokens,
        "completed_s": completed,
        # the longest time without a request ending (from the start to the first, and between any two)
        "max_completion_gap_s": float(np.diff([0.0, *completed]).max()) if completed else 0.0,
        # the longest time in which no request got a token (from the start, so the first prefill
        # counts): a stalled pipeline shows here first
        "max_token_gap_s": float(np.diff([0.0, *sorted(t - t0 for r in reqs for t in r.token_times)]).max()),
        "outputs": [r.tokens for r in reqs],
    }


def engine_drive(engine, prompts: list[list[int]], params: SamplingParams) -> dict:
    """The in-process engine on the same prompts, one after the other (it has no batching)."""
    ttft, tpot, outputs = [], [], []
    t0 = time.perf_counter()
    for p in prompts:
        g = engine.generate(p, max_new_tokens=params.max_new_tokens, do_sample=params.do_sample, seed=params.seed,
                            temperature=params.temperature, top_p=params.top_p)  # fmt: skip
        ttft.append(g.ttft_s)
        tpot.extend(g.tpot_s)
        outputs.append(g.token_ids)
    wall = time.perf_counter() - t0
    tokens = sum(len(o) for o in outputs)
    return {"tokens_per_s": tokens / wall, "ttft_s": percentiles(ttft), "tpot_s": percentiles(tpot),
            "wall_s": wall, "tokens": tokens, "outputs": outputs}  # fmt: skip


def stage_totals(stages: list[dict]) -> dict:
    """Cache figures summed over the stages (hit rate = all hits / all accesses)."""
    acc = sum(s["accesses"] for s in stages)
    pre = sum(s["prefetched"] for s in stages)
    used = sum(s["prefetch_used"] for s in stages)
    misses = sum(s["misses"] for s in stages)
    return {
        "hit_rate": sum(s["hits"] for s in stages) / acc if acc else 0.0,
        "precision": used / pre if pre else 0.0,
        "recall": used / (used + misses) if used + misses else 0.0,
        "stall_s": sum(s["stall_s"] for s in stages),
        "bytes_moved": int(sum(s["bytes_moved"] for s in stages)),
        "accesses": acc,
    }


def prompt_ids(tokenizer, records: list[dict], max_prompt: int = 256) -> list[list[int]]:
    """Workload records' prompts as token ids (at most ``max_prompt``; an empty one becomes BOS)."""
    return [tokenizer(r["prompt"]).input_ids[:max_prompt] or [tokenizer.bos_token_id] for r in records]


def warmed_store(model: Path, entries: list[tuple[np.ndarray, np.ndarray]]):
    """An in-process map store shaped for ``model`` (read from a probe engine) holding ``entries``."""
    from expertmap.actors.engine import OffloadEngine
    from expertmap.predictor.map_store_memory import InMemoryMapStore

    probe = OffloadEngine(EngineConfig(model=model, policy="on-demand", link=link_config("instant")))
    shape = dict(num_layers=len(probe.layers), num_experts=probe.num_experts,
                 embed_dim=probe.model.config.hidden_size, prefetch_distance=defaults.PREFETCH_DISTANCE)  # fmt: skip
    probe.close()
    store = InMemoryMapStore(**shape)
    for e, m in entries:
        store.add(e, m)
    return store


def warm_entries(traces: list[RequestTrace]) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(it.embedding, it.expert_map()) for req in traces for it in req.iterations]


@dataclass
class PipelineBenchConfig:
    out: Path
    gpus: int
    workload: Path = DEFAULT_WORKLOAD
    model: Path = defaults.BUNDLED_MODEL
    warm: Path | None = None
    limit: int = 32
    warm_limit: int = 200
    policies: tuple[str, ...] = ("on-demand", "lfu", "fate", "mixtral-offloading", "moe-infinity", "finemoe", "hybrid")
    budget: str = defaults.BUDGET
    link: str = defaults.LINK  # a link name as link_config parses it
    max_new_tokens: int = defaults.MAX_NEW_TOKENS
    greedy: bool = False
    seed: int = 0
    concurrency: int = 8
    prefetch_distance: int = defaults.PREFETCH_DISTANCE
    device: str = "cpu"


def run_policies(cfg: PipelineBenchConfig) -> dict:
    """Every policy on an N-stage pipeline, same prompts and seeds; results.json as
    docs/benchmarks.md describes it, plus each policy's per-stage figures."""
    import ray

    from expertmap.cluster.pipeline import Pipeline, PipelineConfig
    from expertmap.predictor.policies import policy_class

    skipped = [p for p in cfg.policies if policy_class(p).needs_trace]
    policies = [p for p in cfg.policies if p not in skipped]
    if skipped:
        logger.warning("%s: replay-only (needs the run's future trace), left out of --gpus runs", ", ".join(skipped))
    link = link_config(cfg.link)
    records = load_workload(cfg.workload)
    warm, evals = (load_workload(cfg.warm), records) if cfg.warm else split(records, 0.7, cfg.seed)
    warm, evals = warm[: cfg.warm_limit], evals[: cfg.limit]
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, do_sample=not cfg.greedy, seed=cfg.seed)
    recorder = TraceRecorder(cfg.model, cfg.device)
    tokenizer = recorder.engine.tokenizer
    prompts = prompt_ids(tokenizer, evals)
    entries = []
    if any(policy_class(p).needs_store for p in policies):
        traces = recorder.record_all(warm, cfg.max_new_tokens, do_sample=not cfg.greedy, seed=cfg.seed, desc="warm-up traces")
        entries = warm_entries(traces)
    recorder.close()
    start_local_ray(cfg.gpus)
    results: dict = {"policies": {}}
    outputs = []
    for policy in tqdm(policies, desc=f"policies on {cfg.gpus} stages", unit="policy"):
        engine = EngineConfig(model=cfg.model, device=cfg.device, policy=policy, budget=Budget.parse(cfg.budget), link=link)
        name = f"bench-map-service-{policy}-{time.time_ns()}"
        pipe = Pipeline(PipelineConfig(engine=engine, gpus=cfg.gpus, prefetch_distance=cfg.prefetch_distance,
                                       map_service_name=name))  # fmt: skip
        try:
            if pipe.map_service is not None and entries:
                ray.get(pipe.map_service.add_many.remote(entries))
            run = drive(pipe, prompts, params, cfg.concurrency, desc=policy)
            stages = pipe.stats()
        finally:
            pipe.close()
            if pipe.map_service is not None:
                ray.kill(pipe.map_service)
        row = {**stage_totals(stages), "ttft_s": {k: run["ttft_s"][k] for k in ("p50", "p99")}, "tpot_s": run["tpot_s"],
               "tokens_per_s": run["tokens_per_s"], "overhead_frac": None, "stages": stages,
               "layer_time_s": pipe.layer_time_s}  # fmt: skip
        results["policies"][policy] = row
        outputs += [{"id": r["id"], "policy": policy, "text": tokenizer.decode(o, skip_special_tokens=True)}
                    for r, o in zip(evals, run["outputs"])]  # fmt: skip
    results["config"] = {
        "model": recorded(cfg.model), "workload": recorded(cfg.workload), "gpus": cfg.gpus, "concurrency": cfg.concurrency,
        "eval_prompts": len(prompts), "warm_prompts": len(warm), "budget": cfg.budget, "link": cfg.link,
        "copy_layer_ratio": link.copy_layer_ratio, "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed,
        "decoding": "greedy" if cfg.greedy else "seeded sampling", "prefetch_distance": cfg.prefetch_distance,
        "timing": "real time: Ray stage actors, emulated link per stage", "skipped": skipped,
    }  # fmt: skip
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "results.json").write_text(json.dumps(results, indent=1))
    with open(cfg.out / "outputs.jsonl", "w") as f:
        for line in outputs:
            f.write(json.dumps(line) + "\n")
    write_pipeline_report(results, cfg.out)
    return results


def _ratio(cfg: dict) -> str:
    r = cfg.get("copy_layer_ratio")
    return f" (ratio {r:.1f})" if r else ""


def write_pipeline_report(results: dict, out: Path) -> None:
    cfg = results["config"]
    lines = [
        f"# Pipeline benchmark: {cfg['gpus']} stages, concurrency {cfg['concurrency']}",
        "",
        f"{cfg['eval_prompts']} prompts of `{cfg['workload']}`, {cfg['max_new_tokens']} new tokens, {cfg['decoding']}, "
        f"budget {cfg['budget']} of each stage's experts, link `{cfg['link']}`{_ratio(cfg)} per stage.",
        "",
        "| policy | hit rate | per-stage hit rate | tokens/s | TTFT p50 ms | TPOT p50 ms | TPOT p99 ms | stall s | moved MiB |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results["policies"].items():
        per = " / ".join(f"{s['hit_rate']:.2f}" for s in r["stages"])
        lines.append(
            f"| {name} | {r['hit_rate']:.3f} | {per} | {r['tokens_per_s']:.1f} | {r['ttft_s']['p50'] * 1e3:.0f} | "
            f"{r['tpot_s']['p50'] * 1e3:.1f} | {r['tpot_s']['p99'] * 1e3:.1f} | {r['stall_s']:.1f} | "
            f"{r['bytes_moved'] / 2**20:.0f} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(results["policies"])
    n = cfg["gpus"]
    width = 0.8 / n
    for k in range(n):
        ax.bar([i + k * width for i in range(len(names))],
               [results["policies"][p]["stages"][k]["hit_rate"] for p in names], width, label=f"stage {k}")  # fmt: skip
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=20, fontsize=8)
    ax.set_ylabel("hit rate")
    ax.set_title(f"hit rate per stage ({n} stages)")
    ax.legend(fontsize=7)
    save(fig, out / "hit_rate_per_stage.png")
