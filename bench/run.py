"""`expertmap bench`: every policy on the same prompts, same routing, same budget and link.

Protocol (docs/benchmarks.md): the map store is warmed from one sample of the workload, the
policies run on a disjoint sample, with the same prompts and seeds. Two measurements:

1. Trace-driven replay (``bench/simulator.py``) over all evaluation prompts: hit rate, precision,
   recall, stall, bytes moved and per-token time for every policy, every budget of the sweep and
   every prefetch distance of the sweep, in decode-layer units converted to seconds with the
   layer time measured on this machine.
2. The real engine (threads, emulated link in real time) on the first ``engine_prompts`` prompts:
   each policy's generated text (``outputs.jsonl``; must equal `resident`'s), its measured TTFT,
   TPOT and the predictor's critical-path cost. This also validates the replay.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm import tqdm

from expertmap.actors import defaults
from expertmap.actors.config import Budget, EngineConfig, HostConfig, LinkConfig
from expertmap.actors.host_compute import check_miss_mode
from expertmap.actors.host_profiles import host_config
from expertmap.actors.engine import OffloadEngine
from expertmap.actors.link_profiles import link_config
from expertmap.bench.paths import DEFAULT_WORKLOAD, recorded
from expertmap.actors.trace_recorder import RequestTrace, TraceRecorder
from expertmap.cluster.workload import load_workload, split
from expertmap.bench.simulator import access_trace, host_cache, replay, summarize_units
from expertmap.predictor.map_store_memory import InMemoryMapStore
from expertmap.predictor.policies import POLICIES, PolicyInputs, make_policy, policy_class
from expertmap.predictor.replica import StoreReplica

logger = logging.getLogger(__name__)


DEFAULT_POLICIES = ("resident", "on-demand", "lfu", "oracle", "finemoe", "fate", "moe-infinity", "mixtral-offloading", "hybrid")


@dataclass
class BenchConfig:
    out: Path
    workload: Path = DEFAULT_WORKLOAD
    model: Path = defaults.BUNDLED_MODEL
    warm: Path | None = None
    limit: int = 200
    warm_limit: int = 400
    policies: tuple[str, ...] = DEFAULT_POLICIES
    budget: str = defaults.BUDGET
    budgets: tuple[float, ...] = (0.125, 0.25, 0.5)
    distances: tuple[int, ...] = (1, 2, 3, 4, 6)
    prefetch_distance: int = defaults.PREFETCH_DISTANCE
    link: str = defaults.LINK  # a link name as link_config parses it (a profile, ratio:R, instant)
    max_new_tokens: int = defaults.MAX_NEW_TOKENS
    greedy: bool = False
    seed: int = 0
    store_capacity: int = 1000
    engine_prompts: int = 8
    device: str = "cpu"
    # the semantic embedding the map store is searched with: the model's pooled token embeddings
    # (FineMoE's) or an all-MiniLM-L6-v2 sentence embedding of the text seen so far (384 dims)
    embedding: Literal["token", "minilm"] = "token"
    # --budgets: the regime grid's budgets (each link of --link x each of these); empty: --budget only
    grid_budgets: tuple[str, ...] = ()
    # what a miss does (copy: wait for the link; host / auto: actors/host_compute.py); with host or
    # auto every policy also runs in that mode beside copy, and the host-all / host-static baselines run
    miss: str = defaults.MISS
    host: str = defaults.HOST  # a host profile (expertmap.actors.host_profiles) or ratio:R
    planner: str = "process"  # where the engine run's policies plan (PolicyInputs.planner)


def replay_ratio(link: LinkConfig) -> float:
    """The copy/layer ratio the replay runs at: the link's own, 0 for an instant link."""
    if link.mode == "instant":
        return 0.0
    if link.copy_layer_ratio is None:
        raise ValueError(
            f"link {link.profile!r} has no copy/layer ratio for the replay (real copies): "
            "use a link profile, ratio:R or instant"
        )
    return link.copy_layer_ratio


def build_store(traces: list[RequestTrace], num_layers: int, num_experts: int, capacity: int, distance: int):
    dim = traces[0].iterations[0].embedding.shape[0]
    store = InMemoryMapStore(num_layers, num_experts, dim, capacity, prefetch_distance=distance)
    for req in traces:
        for it in req.iterations:
            store.add(it.embedding, it.expert_map())
    return store


def clone_store(store: InMemoryMapStore) -> InMemoryMapStore:
    """An independent copy (map policies publish into their store while they run)."""
    twin = InMemoryMapStore(store.num_layers, store.num_experts, store.embed_dim, store.capacity,
                            prefetch_distance=store.prefetch_distance)  # fmt: skip
    for embedding, expert_map in zip(*store.arrays()):  # fewer than capacity: no replacement happens
        twin.add(embedding, expert_map)
    return twin


def request_eams(traces: list[RequestTrace], num_layers: int, num_experts: int) -> np.ndarray:
    eams = np.zeros((len(traces), num_layers, num_experts), np.float32)
    for i, req in enumerate(traces):
        for it in req.iterations:
            for layer, experts in enumerate(it.selected):
                eams[i, layer, experts] += 1
    return eams


class PolicyFactory:
    """Builds each policy with what it needs: the oracle its trace, map policies a store replica."""

    def __init__(self, store, eams, shape, distance, model: Path | None = None, planner: str = "process"):
        self.store, self.eams, self.shape, self.distance = store, eams, shape, distance
        self.model = model  # its folder: policies take the settings it ships (Policy.tuning_for_model)
        self.planner = planner  # where a background planner runs (PolicyInputs.planner)

    def inputs(self, name: str, trace, synchronous: bool, distance: int | None = None) -> PolicyInputs:
        """What policy ``name`` needs, by its class's flags (each its own copy of the store)."""
        cls = policy_class(name)
        return PolicyInputs(
            prefetch_distance=distance or self.distance,
            replica=StoreReplica(clone_store(self.store)) if cls.needs_store else None,
            trace=trace if cls.needs_trace else None,
            eams=self.eams.copy() if cls.needs_eams else None,
            synchronous=synchronous,
            planner=self.planner,
            usage=self.eams.sum(axis=0) if cls.needs_usage else None,  # warm-up selections per expert
            tuning=cls.tuning_for_model(self.model) if self.model is not None else None,
        )

    def make(self, name, slots, prefetch, trace, distance=None, copy_layers=None):
        L, J, k = self.shape
        inputs = self.inputs(name, trace, True, distance)
        return make_policy(name, inputs.context(L, J, k, slots, prefetch, copy_layers=copy_layers))


def variants(policies) -> list[tuple[str, str, bool]]:
    """(row label, policy, prefetch on) including each predictive policy's eviction-only ablation."""
    out = []
    for p in policies:
        out.append((p, p, True))
        if policy_class(p).predictive:
            out.append((f"{p} (no prefetch)", p, False))
    return out


def host_variants(rows, miss: str) -> list[tuple[str, str, bool, str]]:
    """(row label, policy, prefetch on, miss mode): with ``--miss host|auto`` each row again in that
    mode (``label [auto]``), and the host-all / host-static baselines if not asked for already."""
    if check_miss_mode(miss) == "copy":
        return []
    out = [(f"{label} [{miss}]", name, prefetch, miss) for label, name, prefetch in rows
           if name != "resident" and not policy_class(name).host_misses]  # fmt: skip
    for name in ("host-all", "host-static"):
        if not any(n == name for _, n, _ in rows):
            out.append((name, name, True, "host"))
    return out


def replay_row(factory, name, prefetch, traces, slots, ratio, layer_s, expert_bytes, all_keys, distance=None,
               miss: str = "copy", host: HostConfig | None = None, make_cache=None):  # fmt: skip
    """One replay. ``miss`` host/auto (always host for host-all / host-static) needs ``host``, a
    HostConfig with its ratios (``host_config``). ``make_cache``: a copy-mode replay cache of the
    caller's (bench/regimes.py: with loss attribution)."""
    t0 = time.perf_counter()
    policy = factory.make(name, slots, prefetch, access_trace(traces), distance, copy_layers=ratio)
    if policy.host_misses:
        miss = "host"
    if miss != "copy":
        if host is None or host.decode_ratio is None:
            raise ValueError(f"policy {name!r} with miss mode {miss!r} needs a host profile with its ratios")
        make_cache = host_cache(miss, host.decode_ratio, host.crossover_tokens)
    res = replay(policy, traces, slots, ratio, resident_keys=all_keys, make_cache=make_cache)
    wall = time.perf_counter() - t0
    s = res.stats
    tpot = summarize_units(res.iteration_units)
    ttft = summarize_units(res.prefill_units)
    decode_tokens = len(res.iteration_units) + len(traces)
    total_units = sum(res.iteration_units) + sum(res.prefill_units)
    return {
        "hit_rate": s.hit_rate,
        "precision": s.precision,
        "recall": s.recall,
        "stall_s": s.stall_s * layer_s,
        "bytes_moved": int(s.copies * expert_bytes),
        "ttft_s": {"p50": ttft["p50"] * layer_s, "p99": ttft["p99"] * layer_s},
        "tpot_s": {k: v * layer_s for k, v in tpot.items()},
        "tokens_per_s": decode_tokens / (total_units * layer_s) if total_units else 0.0,
        "overhead_frac": None,
        "accesses": s.accesses,
        "prefetched": s.prefetched,
        "link_busy_frac": res.link_busy_units / total_units if total_units else 0.0,
        "replay_wall_s": wall,
        "miss": miss,
        "host_computed": s.host_computed,  # misses computed on the host
        "host_busy_frac": res.host_busy_units / total_units if total_units else 0.0,
    }


def run_engine_rows(cfg: BenchConfig, rows, prompts: list[RequestTrace], factory, link: LinkConfig, out_lines: list,
                    miss_of: dict[str, str] | None = None, host: HostConfig | None = None,
                    layer_time_s: float | None = None):  # fmt: skip
    """Real engine, real-time emulated link: texts, TTFT/TPOT, critical-path overhead.
    ``miss_of``: row label -> miss mode (default copy); ``host``: the host profile for host/auto rows;
    ``layer_time_s``: the decode-layer time every engine's emulated link is derived from (None: the
    first engine measures it and the others share it, so that every policy gets the same link)."""
    results = {}
    budget = Budget.parse(cfg.budget)
    for label, name, prefetch in tqdm(rows, desc="engine runs", unit="policy"):
        trace = None
        if name == "oracle":
            trace = [it.selected for req in prompts for it in req.iterations]
        miss = (miss_of or {}).get(label, "copy")
        engine = OffloadEngine(
            EngineConfig(model=cfg.model, device=cfg.device, policy=name, budget=budget, link=link, prefetch=prefetch,
                         miss=miss, host=host or HostConfig()),
            factory.inputs(name, trace, synchronous=False), layer_time_s=layer_time_s,
        )  # fmt: skip
        layer_time_s = engine.layer_time_s
        ttfts, tpots, texts = [], [], []
        for req in prompts:
            g = engine.generate(
                engine.tokenizer(req.prompt).input_ids[:256] or [engine.tokenizer.bos_token_id],
                max_new_tokens=cfg.max_new_tokens, do_sample=not cfg.greedy, seed=cfg.seed,
            )  # fmt: skip
            ttfts.append(g.ttft_s)
            tpots.extend(g.tpot_s)
            texts.append(g.text)
            out_lines.append({"id": req.id, "policy": label, "text": g.text})
        s = engine.stats
        engine.close()
        results[label] = {
            "hit_rate": s.hit_rate,
            "precision": s.precision,
            "recall": s.recall,
            "stall_s": s.stall_s,
            "bytes_moved": s.bytes_moved,
            "ttft_s": {"p50": float(np.percentile(ttfts, 50)), "p99": float(np.percentile(ttfts, 99))},
            "tpot_s": {
                "mean": float(np.mean(tpots)),
                "p50": float(np.percentile(tpots, 50)),
                "p99": float(np.percentile(tpots, 99)),
            },
            "tokens_per_s": len(tpots) / max(1e-9, sum(tpots)),
            "overhead_frac": engine.overhead_frac,
            "prediction_frac": engine.prediction_frac,
            "process_frac": engine.process_frac,
            "decision_frac": engine.decision_frac,
            "waiting_frac": engine.waiting_frac,
            "unstalled_s": engine.unstalled_s,
            "accesses": s.accesses,
            "texts_equal_resident": None,
            "layer_time_s": engine.layer_time_s,
            "miss": "host" if engine.policy.host_misses else miss,
            "host_computed": s.host_computed,
            "host_busy_frac": engine.runtime.host_compute.busy_frac() if engine.runtime.host_compute else 0.0,
        }
        results[label]["_texts"] = texts
    ref = results.get("resident", {}).get("_texts")
    for r in results.values():
        texts = r.pop("_texts")
        r["texts_equal_resident"] = None if ref is None else texts == ref
    return results


def run(cfg: BenchConfig) -> dict:
    from expertmap.bench.report import write_report

    cfg.out.mkdir(parents=True, exist_ok=True)
    if cfg.embedding not in ("token", "minilm"):
        raise ValueError(f"embedding {cfg.embedding!r}: use token or minilm")
    if cfg.embedding != "token" and cfg.engine_prompts > 0:
        # the real engine's policies get the model's token embeddings from stage 0, not MiniLM ones
        raise ValueError("--embedding minilm is replay-only for now: use --engine-prompts 0")
    for p in cfg.policies:
        if p not in POLICIES:
            raise ValueError(f"unknown policy {p!r}; choose from {', '.join(sorted(POLICIES))}")
    from expertmap.bench.regimes import regime_grid, split_names

    links = split_names(cfg.link, "--link")  # the main run: the first link (and --budget)
    grid_budgets = list(cfg.grid_budgets) or [cfg.budget]
    link = link_config(links[0])
    ratio = replay_ratio(link)
    records = load_workload(cfg.workload)
    if cfg.warm is not None:
        warm, evals = load_workload(cfg.warm), records
    else:
        warm, evals = split(records, 0.7, cfg.seed)
    warm, evals = warm[: cfg.warm_limit], evals[: cfg.limit]
    logger.info("warm %d prompts, evaluate %d prompts", len(warm), len(evals))

    recorder = TraceRecorder(cfg.model, cfg.device, embedding=cfg.embedding)
    engine = recorder.engine
    L, J, k = len(engine.layers), engine.num_experts, engine.top_k
    total_experts = len(engine.host)
    expert_bytes = engine.host.expert_bytes
    all_keys = engine.host.keys()
    sample = dict(do_sample=not cfg.greedy, seed=cfg.seed)
    warm_traces = recorder.record_all(warm, cfg.max_new_tokens, desc="warm-up traces", **sample)
    eval_traces = recorder.record_all(evals, cfg.max_new_tokens, desc="evaluation traces", **sample)
    embed_cost = None
    if recorder.embed_iterations:
        embed_cost = {"iterations": recorder.embed_iterations, "total_s": recorder.embed_s,
                      "per_iteration_s": recorder.embed_s / recorder.embed_iterations}  # fmt: skip
    recorder.close()

    # the layer time that converts replay units to seconds: measured by an emulated-link engine
    # (it measures the layer time before it uses its ratio; an instant link's replay has none)
    probe = OffloadEngine(EngineConfig(model=cfg.model, device=cfg.device, policy="on-demand",
                                       link=LinkConfig(copy_layer_ratio=ratio or 1.0)))  # fmt: skip
    layer_s = probe.layer_time_s
    probe.close()

    store = build_store(warm_traces, L, J, cfg.store_capacity, cfg.prefetch_distance)
    factory = PolicyFactory(store, request_eams(warm_traces, L, J), (L, J, k), cfg.prefetch_distance, cfg.model,
                            cfg.planner)  # fmt: skip
    slots_of = lambda b: min(total_experts, int(b * total_experts))  # noqa: E731
    main_budget = Budget.parse(cfg.budget).resolve(total_experts * expert_bytes) // expert_bytes
    rows = variants(cfg.policies)
    host = host_config(cfg.host, links[0])
    miss_rows = host_variants(rows, cfg.miss)

    results: dict = {"policies": {}, "budget_sweep": {}, "distance_sweep": {}}
    for label, name, prefetch in tqdm(rows, desc="replay", unit="policy"):
        slots = total_experts if name == "resident" else main_budget
        results["policies"][label] = replay_row(
            factory, name, prefetch, eval_traces, slots, ratio, layer_s, expert_bytes, all_keys, host=host
        )
    for label, name, prefetch, miss in tqdm(miss_rows, desc=f"replay, --miss {cfg.miss}", unit="policy"):
        results["policies"][label] = replay_row(factory, name, prefetch, eval_traces, main_budget, ratio, layer_s,
                                                expert_bytes, all_keys, miss=miss, host=host)  # fmt: skip
    for b in tqdm(cfg.budgets, desc="budget sweep", unit="budget"):
        results["budget_sweep"][str(b)] = {
            label: replay_row(factory, name, prefetch, eval_traces, slots_of(b), ratio, layer_s, expert_bytes, all_keys)
            for label, name, prefetch in rows
            if name != "resident" and prefetch
        }
        results["budget_sweep"][str(b)].update({
            label: replay_row(factory, name, prefetch, eval_traces, slots_of(b), ratio, layer_s, expert_bytes, all_keys,
                              miss=miss, host=host)
            for label, name, prefetch, miss in miss_rows
            if prefetch
        })  # fmt: skip
    for d in tqdm(cfg.distances, desc="distance sweep", unit="d"):
        results["distance_sweep"][str(d)] = {
            name: replay_row(factory, name, True, eval_traces, main_budget, ratio, layer_s, expert_bytes, all_keys, d)
            for name in ("finemoe", "hybrid", "moe-infinity")
            if name in cfg.policies and d <= L
        }

    results["grid"] = regime_grid(factory, rows, eval_traces, links, grid_budgets, total_experts, expert_bytes,
                                  all_keys, layer_s, progress=lambda c: tqdm(c, desc="regime grid", unit="cell"))
    main_cell = results["grid"].get(f"{links[0]}/{cfg.budget}", {})
    results["attribution"] = {label: row["attribution"] for label, row in main_cell.items()}

    outputs: list[dict] = []
    engine_rows = [r for r in rows if r[2]]
    results["engine"] = {}
    if cfg.engine_prompts > 0:
        engine_rows += [(label, name, prefetch) for label, name, prefetch, _ in miss_rows if prefetch]
        results["engine"] = run_engine_rows(cfg, engine_rows, eval_traces[: cfg.engine_prompts], factory, link, outputs,
                                            miss_of={r[0]: r[3] for r in miss_rows}, host=host,
                                            layer_time_s=layer_s)  # fmt: skip
    for label, row in results["engine"].items():
        if label in results["policies"]:
            results["policies"][label]["overhead_frac"] = row["overhead_frac"]
    results["config"] = {
        "model": recorded(cfg.model), "workload": recorded(cfg.workload), "warm": recorded(cfg.warm) or "70% split",
        "warm_prompts": len(warm), "eval_prompts": len(evals), "engine_prompts": min(cfg.engine_prompts, len(evals)),
        "budget": cfg.budget, "budget_slots": int(main_budget), "total_experts": total_experts,
        "link": links[0], "copy_layer_ratio": ratio, "layer_time_s": layer_s,
        "grid_links": {name: replay_ratio(link_config(name)) for name in links}, "grid_budgets": grid_budgets,
        "miss": cfg.miss, "host": cfg.host, "host_decode_ratio": host.decode_ratio,
        "host_crossover_tokens": host.crossover_tokens,
        "max_new_tokens": cfg.max_new_tokens, "decoding": "greedy" if cfg.greedy else "seeded sampling",
        "seed": cfg.seed, "store_capacity": cfg.store_capacity, "store_entries": len(store),
        "prefetch_distance": cfg.prefetch_distance, "timing": "replay (virtual time, layer units x measured layer time)",
        "embedding": cfg.embedding, "embedding_dim": int(store.embed_dim), "embedding_cost": embed_cost,
    }  # fmt: skip
    with open(cfg.out / "outputs.jsonl", "w") as f:
        for line in outputs:
            f.write(json.dumps(line) + "\n")
    (cfg.out / "results.json").write_text(json.dumps(results, indent=1))
    write_report(results, cfg.out)
    return results
