"""Misses computed on the host: TPOT against budget, copy vs auto per policy, per host profile.

    python -m expertmap.bench.host_bench --out bench/results/host_compute

Trace-driven replay (bench/simulator.py, ``HostReplayCache`` for the host path) of the same
evaluation prompts for every row: each policy copy-only and with ``--miss auto`` under each host
profile, the host-all and host-static baselines, at every budget of the sweep; the copy-only
oracle is the line to beat. A few prompts also run on the real engine (emulated link and host,
real time) to check that every mode gives `resident`'s tokens. Writes results.json, results.md,
tpot_vs_budget.png and README.md (the command and the table, ready to paste) in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import pickle
import sys
import time
from pathlib import Path

import numpy as np
from expertmap.actors import defaults
from expertmap.actors.config import Budget, EngineConfig, LinkConfig
from expertmap.actors.engine import OffloadEngine
from expertmap.actors.host_profiles import host_config
from expertmap.actors.link_profiles import link_config
from expertmap.actors.trace_recorder import TraceRecorder
from expertmap.bench.paths import DEFAULT_WORKLOAD, recorded
from expertmap.bench.plotting import pyplot, save
from expertmap.bench.run import PolicyFactory, build_store, replay_ratio, replay_row, request_eams
from expertmap.cluster.workload import load_workload, split

logger = logging.getLogger(__name__)

DEFAULT_OUT = "bench/results/host_compute"
POLICIES = ("on-demand", "lfu", "finemoe", "hybrid")
HOSTS = ("desktop-ddr5", "server-ddr5-8ch")
BUDGETS = (0.1875, 0.25, 0.375, 0.5)
BASELINES = ("host-all", "host-static")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m expertmap.bench.host_bench", description=__doc__.split("\n")[0])
    ap.add_argument("--workload", default=str(DEFAULT_WORKLOAD), help="JSONL prompts (default: the bundled sample)")
    ap.add_argument("--warm-limit", type=int, default=300, help="warm-up prompts (default 300)")
    ap.add_argument("--limit", type=int, default=80, help="evaluation prompts (default 80)")
    ap.add_argument("--max-new-tokens", type=int, default=defaults.MAX_NEW_TOKENS, help="new tokens per prompt")
    ap.add_argument("--link", default=defaults.LINK, help=f"link profile or ratio:R (default {defaults.LINK})")
    ap.add_argument("--hosts", default=",".join(HOSTS), help="comma-separated host profiles or ratio:R")
    ap.add_argument("--policies", default=",".join(POLICIES), help="comma-separated policies run copy vs auto")
    ap.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="comma-separated budget fractions")
    ap.add_argument("--budget", default=defaults.BUDGET, help="the budget of the table (default 0.25)")
    ap.add_argument("--engine-prompts", type=int, default=2, help="prompts also run on the real engine (0: none)")
    ap.add_argument("--seed", type=int, default=0, help="sampling and split seed")
    ap.add_argument("--traces", default=None, help="cache the recorded traces in this pickle file (re-used if present)")
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    ap.add_argument("--engine-only", action="store_true",
                    help="re-run only the real-engine check into --out/results.json (needs --traces), then re-render")
    ap.add_argument("--render-only", action="store_true",
                    help="re-write results.md, the plot and README.md from --out/results.json (no run)")
    return ap.parse_args(argv)


def record(args, model: Path):
    if args.traces and Path(args.traces).is_file():
        with open(args.traces, "rb") as f:
            return pickle.load(f)
    records = load_workload(Path(args.workload))
    warm, evals = split(records, 0.7, args.seed)
    warm, evals = warm[: args.warm_limit], evals[: args.limit]
    recorder = TraceRecorder(model, "cpu")
    e = recorder.engine
    shape = (len(e.layers), e.num_experts, e.top_k)
    info = {"total_experts": len(e.host), "expert_bytes": e.host.expert_bytes, "all_keys": e.host.keys()}
    sample = {"do_sample": True, "seed": args.seed}
    warm_t = recorder.record_all(warm, args.max_new_tokens, desc="warm-up traces", **sample)
    eval_t = recorder.record_all(evals, args.max_new_tokens, desc="evaluation traces", **sample)
    recorder.close()
    probe = OffloadEngine(EngineConfig(model=model, policy="on-demand", link=LinkConfig(copy_layer_ratio=1.0)))
    info["layer_s"] = probe.layer_time_s
    probe.close()
    data = (warm_t, eval_t, shape, info)
    if args.traces:
        with open(args.traces, "wb") as f:
            pickle.dump(data, f)
    return data


def engine_check(model, prompts, link, budget, hosts, policies, factory, new_tokens, seed) -> dict:
    """Real engine, emulated link and host in real time: does every mode give resident's tokens?"""
    rows = [("resident", "copy", hosts[0])] + [(p, m, h) for p in policies for m in ("copy", "auto") for h in hosts
                                                if m == "auto" or h == hosts[0]]  # fmt: skip
    rows += [(b, "host", h) for b in BASELINES for h in hosts[:1]]
    out, ref, layer_s = {}, None, None
    for name, miss, h in rows:
        trace = None
        engine = OffloadEngine(EngineConfig(model=model, policy=name, budget=budget, link=link, miss=miss,
                                            host=host_config(h, link.profile)), factory.inputs(name, trace, False),
                               layer_time_s=layer_s)  # fmt: skip
        layer_s = engine.layer_time_s  # the first engine's, shared: one link for every row
        tokens, tpots, host_n = [], [], 0
        for req in prompts:
            ids = engine.tokenizer(req.prompt).input_ids[:256]
            g = engine.generate(ids, max_new_tokens=new_tokens, do_sample=True, seed=seed)
            tokens.append(g.token_ids)
            tpots.extend(g.tpot_s)
            host_n += g.stats.host_computed
        engine.close()
        if name == "resident":
            ref = tokens
        label = f"{name} {miss}" + (f" {h}" if miss != "copy" else "")
        out[label] = {"tokens_equal_resident": tokens == ref, "tpot_ms": 1e3 * float(np.mean(tpots)), "host_computed": host_n,
                      # each engine measures its own layer time (the link's and host's unit): TPOT in it compares
                      "layer_time_ms": 1e3 * engine.layer_time_s, "tpot_layers": float(np.mean(tpots)) / engine.layer_time_s}
        logger.info("engine %s: equal %s, TPOT %.1f ms", label, tokens == ref, out[label]["tpot_ms"])
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.render_only:
        results = json.loads((out / "results.json").read_text())
        render(results, out, results["config"]["command"])
        return 0
    model = defaults.BUNDLED_MODEL
    link = link_config(args.link)
    ratio = replay_ratio(link)
    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    host_cfgs = {h: host_config(h, args.link) for h in hosts}  # errors before any work
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    budgets = [float(b) for b in args.budgets.split(",")]
    main_budget = float(Budget.parse(args.budget).fraction)
    if main_budget not in budgets:
        budgets.append(main_budget)
    budgets.sort()

    if args.engine_only:
        results = json.loads((out / "results.json").read_text())
        warm_t, eval_t, shape, info = record(args, model)
        L, J, _k = shape
        factory = PolicyFactory(build_store(warm_t, L, J, 1000, defaults.PREFETCH_DISTANCE), request_eams(warm_t, L, J),
                                shape, defaults.PREFETCH_DISTANCE)  # fmt: skip
        results["engine"] = engine_check(model, eval_t[: args.engine_prompts], link, main_budget, hosts, ["hybrid"],
                                         factory, min(args.max_new_tokens, 16), args.seed)  # fmt: skip
        (out / "results.json").write_text(json.dumps(results, indent=1))
        print(render(results, out, results["config"]["command"]))
        return 0
    t0 = time.perf_counter()
    warm_t, eval_t, shape, info = record(args, model)
    L, J, _k = shape
    factory = PolicyFactory(build_store(warm_t, L, J, 1000, defaults.PREFETCH_DISTANCE), request_eams(warm_t, L, J),
                            shape, defaults.PREFETCH_DISTANCE)  # fmt: skip
    total, eb, keys, layer_s = info["total_experts"], info["expert_bytes"], info["all_keys"], info["layer_s"]
    rows: dict[str, dict[str, dict]] = {}  # budget -> label -> row
    for b in budgets:
        slots = min(total, int(b * total))
        r = rows[str(b)] = {}
        for p in [*policies, "oracle"]:
            r[f"{p} copy"] = replay_row(factory, p, True, eval_t, slots, ratio, layer_s, eb, keys)
            if p == "oracle":
                continue
            for h, hc in host_cfgs.items():
                r[f"{p} auto {h}"] = replay_row(factory, p, True, eval_t, slots, ratio, layer_s, eb, keys, miss="auto", host=hc)
        for base in BASELINES:
            for h, hc in host_cfgs.items():
                r[f"{base} {h}"] = replay_row(factory, base, True, eval_t, slots, ratio, layer_s, eb, keys, host=hc)
        logger.info("budget %s done (%.0f s)", b, time.perf_counter() - t0)
    resident = replay_row(factory, "resident", True, eval_t, total, ratio, layer_s, eb, keys)

    engine = {}
    if args.engine_prompts > 0:
        engine = engine_check(model, eval_t[: args.engine_prompts], link, main_budget, hosts, ["hybrid"], factory,
                              min(args.max_new_tokens, 16), args.seed)  # fmt: skip

    config = {
        "model": recorded(model), "workload": recorded(args.workload), "warm_prompts": len(warm_t),
        "eval_prompts": len(eval_t), "max_new_tokens": args.max_new_tokens, "decoding": "seeded sampling",
        "seed": args.seed, "link": args.link, "copy_layer_ratio": ratio, "layer_time_s": layer_s,
        "budget": main_budget, "budgets": budgets, "policies": policies,
        "hosts": {h: {"decode_ratio": c.decode_ratio, "crossover_tokens": c.crossover_tokens} for h, c in host_cfgs.items()},
        "miss": "copy and auto", "timing": "replay (virtual time, layer units x measured layer time)",
        "engine_prompts": args.engine_prompts, "wall_s": time.perf_counter() - t0,
    }  # fmt: skip
    given = list(argv if argv is not None else sys.argv[1:])
    if "--traces" in given:  # a cache of the recorded traces: not part of what is measured
        i = given.index("--traces")
        del given[i : i + 2]
    config["command"] = ("OMP_NUM_THREADS=1 python -m expertmap.bench.host_bench " + " ".join(given)).strip()
    results = {"config": config, "resident": resident, "budget_sweep": rows, "engine": engine}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(render(results, out, config["command"]))
    return 0


def render(results: dict, out: Path, command: str) -> str:
    hosts, policies = list(results["config"]["hosts"]), results["config"]["policies"]
    md = report(results, hosts, policies)
    (out / "results.md").write_text(md)
    plot(results, hosts, policies, out / "tpot_vs_budget.png")
    (out / "README.md").write_text(readme(md, command, results["config"]["link"]))
    return md


def _ms(row) -> float:
    return row["tpot_s"]["mean"] * 1e3


def report(results: dict, hosts, policies) -> str:
    cfg = results["config"]
    b = str(cfg["budget"])
    r = results["budget_sweep"][b]
    base = r.get("on-demand copy", None)
    lines = [
        f"Replay of {cfg['eval_prompts']} prompts x {cfg['max_new_tokens']} tokens (store warmed from {cfg['warm_prompts']}), "
        f"budget {float(b):.0%}, link {cfg['link']} (copy = {cfg['copy_layer_ratio']:.1f} decode-layer times); host "
        + ", ".join(f"{h}: one expert, one decode token = {c['decode_ratio']:.2f} layer times, compute-bound from "
                    f"{c['crossover_tokens']:.0f} tokens" for h, c in cfg["hosts"].items())
        + f". All-resident TPOT {_ms(results['resident']):.2f} ms.",
        "",
        "| row | miss | host | hit rate | TPOT ms | vs on-demand copy | TTFT p50 ms | on host | host busy | link busy |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, row in r.items():
        parts = label.split(" ")
        name, rest = parts[0], parts[1:]
        miss = row["miss"]
        host = rest[-1] if miss != "copy" else ""
        frac = row["host_computed"] / row["accesses"] if row["accesses"] else 0.0
        vs = f"{_ms(row) / _ms(base):.2f}x" if base else ""
        lines.append(f"| {name} | {miss} | {host} | {row['hit_rate']:.3f} | {_ms(row):.2f} | {vs} | "
                     f"{row['ttft_s']['p50'] * 1e3:.1f} | {frac:.0%} | {row['host_busy_frac']:.0%} | {row['link_busy_frac']:.0%} |")  # fmt: skip
    lines += ["", f"Targets (budget {b}):", ""]
    lines += targets(results, hosts)
    if results["engine"]:
        lines += ["", ("Real engine (emulated link and host, real time, "
                  f"{cfg['engine_prompts']} prompts): tokens equal to `resident`'s:"), "",
                  "| run | tokens = resident | TPOT ms (noisy: shared CPU) | its layer time ms | TPOT in layer times | misses on host |",
                  "| --- | :---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
        for label, e in results["engine"].items():
            lines.append(f"| {label} | {'yes' if e['tokens_equal_resident'] else 'NO'} | {e['tpot_ms']:.1f} | "
                         f"{e.get('layer_time_ms', float('nan')):.2f} | {e.get('tpot_layers', float('nan')):.1f} | {e['host_computed']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def targets(results: dict, hosts) -> list[str]:
    cfg = results["config"]
    sweep = results["budget_sweep"]
    r = sweep[str(cfg["budget"])]
    out = []
    if "on-demand copy" not in r or "hybrid copy" not in r:
        return ["(needs on-demand and hybrid in --policies)"]
    od = _ms(r["on-demand copy"])
    for h in hosts:
        auto = r[f"hybrid auto {h}"]
        goal = 0.5 if h.startswith("desktop") else 0.3
        out.append(f"- {h}: hybrid auto TPOT {_ms(auto) / od:.2f}x on-demand copy (target <= {goal}x); "
                   f"oracle copy {_ms(r['oracle copy']) / od:.2f}x")  # fmt: skip
        for base in BASELINES:
            gain = 1 - _ms(auto) / _ms(r[f"{base} {h}"])
            out.append(f"- {h}: hybrid auto {gain:.0%} faster than {base} (target >= 10%)")
        worst = max((_ms(sweep[b][f"hybrid auto {h}"]) / _ms(sweep[b]["hybrid copy"]), b) for b in sweep)
        out.append(f"- {h}: hybrid auto / hybrid copy at its worst budget ({float(worst[1]):.1%}): {worst[0]:.2f}x (target <= 1)")
        ttft = r[f"hybrid auto {h}"]["ttft_s"]["p50"] / r["hybrid copy"]["ttft_s"]["p50"]
        out.append(f"- {h}: hybrid TTFT p50 auto / copy {ttft:.2f}x (target <= 1)")
    return out


def plot(results: dict, hosts, policies, path: Path) -> None:
    plt = pyplot()

    sweep = results["budget_sweep"]
    budgets = sorted(sweep, key=float)
    x = [float(b) * 100 for b in budgets]
    fig, axes = plt.subplots(1, len(hosts), figsize=(6 * len(hosts), 4.5), sharey=True, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, h in zip(axes[0], hosts):
        for i, p in enumerate(policies):
            c = colors[i % len(colors)]
            ax.plot(x, [_ms(sweep[b][f"{p} copy"]) for b in budgets], "--", color=c, marker="o", label=f"{p} copy")
            ax.plot(x, [_ms(sweep[b][f"{p} auto {h}"]) for b in budgets], "-", color=c, marker="s", label=f"{p} auto")
        for j, base in enumerate(BASELINES):
            ax.plot(x, [_ms(sweep[b][f"{base} {h}"]) for b in budgets], ":", color=colors[(len(policies) + j) % len(colors)],
                    marker="^", label=base)  # fmt: skip
        ax.plot(x, [_ms(sweep[b]["oracle copy"]) for b in budgets], "-", color="black", lw=2, label="oracle copy")
        ax.set_title(f"host {h}")
        ax.set_xlabel("budget (% of expert bytes)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("TPOT ms (replay)")
    axes[0][-1].legend(fontsize=7, ncol=2)
    fig.suptitle(f"copy vs --miss auto, link {results['config']['link']}")
    save(fig, path, dpi=120)


def readme(md: str, command: str, link: str) -> str:
    from expertmap.actors.host_profiles import table
    from expertmap.actors.link_profiles import PROFILES as LINKS

    profiles = table(link if link in LINKS else defaults.LINK)
    return (
        "# Misses computed on the host (`--miss auto`)\n\n"
        "Reproduce (bundled model, trace-driven replay; about 20 minutes on 2 shared cores: recording the traces "
        "about 7, the replays about 12, the engine check a few):\n\n"
        f"```\n{command}\n```\n\n(`--traces FILE` keeps the recorded traces between runs; one thread per process "
        "makes the recording deterministic and faster on a shared machine.)\n\n"
        "Each row replays the same prompts with the same seeds. `copy`: a miss waits for its copy over the link. "
        "`auto`: per miss, the copy or the host CPU computing the expert from host memory, whichever the cost model "
        "says finishes first (actors/host_compute.py); host profiles in actors/host_profiles.py. `host-all`: every "
        "routed expert on the host (llama.cpp `--cpu-moe`); `host-static`: the experts most used in the warm-up "
        "traces pinned on the device, the rest on the host (kTransformers, `--n-cpu-moe`).\n\n"
        "![TPOT against budget](tpot_vs_budget.png)\n\n" + md + "\n"
        "## Host profiles\n\n"
        "`python -m expertmap.actors.host_profiles` (the arithmetic is in actors/host_profiles.py): the host streams an "
        "expert's weights from DRAM once per call (memory-bound, decode) and does 2 flops per weight per token "
        "(compute-bound past the crossover); the stages of one node share its bandwidth and cores (N stages: each "
        "N times slower).\n\n" + profiles + "\n\n"
        "## What the host path guarantees\n\n"
        "The host computes with the host copy of the checkpoint's weights (the same tensors the link copies from): "
        "same weights, same dtype, no quantisation. On a CPU-only machine the device and the host are the same CPU and "
        "the same kernel runs on equal weights, so the tokens are bit-identical to `resident` in every mode (tested: "
        "tests/test_host_compute.py, and the engine rows above). On CUDA the host path is a CPU kernel: same weights, "
        "but its rounding may differ from the GPU kernel's in the last bits, so tokens may diverge after a near-tie; "
        "that path was not run on a GPU in this round (no device was available).\n\n"
        "## Limits of these figures\n\n"
        "- The replay's host is one serial lane per stage (decode is bound by the host's memory bandwidth, so two "
        "experts at once would each take twice as long); the device's layer time does not shrink when some of its "
        "experts run on the host; the link's DMA does not slow the host's memory. Activations' round trip is a fixed "
        "20 us.\n"
        "- The real-engine rows are 2 prompts x 16 tokens on a shared 2-core CPU, in real time: their token check is "
        "exact, their milliseconds are noisy and start from a cold cache (there `host-static` starts from its warm-up "
        "placement); the table's figures are the replay's.\n"
        "- `host-all` allocates its budget's slots but never fills them.\n"
    )


if __name__ == "__main__":
    raise SystemExit(main())
