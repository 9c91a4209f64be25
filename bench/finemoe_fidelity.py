"""The measured effect of each of FineMoE's code rules (docs/finemoe-fidelity.md): `finemoe` with the
code's rules, the paper's, and the code's with one rule swapped for the paper's, in the replay.

    python -m expertmap.bench.finemoe_fidelity --workload $WORKLOADS/dev_mix.jsonl \
        --out bench/results/issue12/finemoe_fidelity_dev.json

Warm-up: the first ``--warm-limit`` prompts of the 70% split of ``--warm`` (default: of
``--workload``, whose disjoint 30% is then evaluated); evaluation: ``--limit`` prompts. Budget
``--budget``, links ``--link`` (comma list). ``--traces`` caches the recorded traces (pickle).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pickle
from pathlib import Path

import numpy as np

from expertmap.actors import defaults

VARIANTS = {
    "code": {},
    "paper": None,
    "code, paper eviction": {"eviction": "paper"},
    "code, LRU ties": {"tie_break": "lru"},
    "code, no band fill": {"band_fill": False},
    "code, paper targets": {"targets": "paper"},
    "code, paper expert count": {"expert_count": "paper"},
    "code, paper priority": {"priority": "paper"},
}


def main(argv=None) -> int:
    from expertmap.actors.trace_recorder import TraceRecorder
    from expertmap.bench.run import PolicyFactory, build_store, replay_ratio, request_eams
    from expertmap.actors.link_profiles import link_config
    from expertmap.bench.simulator import access_trace, replay
    from expertmap.cluster.workload import load_workload, split
    from expertmap.predictor.policies import make_policy
    from expertmap.predictor.policies.finemoe import FineMoETuning

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", required=True, help="JSONL workload to evaluate on")
    ap.add_argument("--warm", default=None, help="warm-up workload (default: the 70%% split of --workload)")
    ap.add_argument("--warm-limit", type=int, default=300, help="warm-up prompts (default 300)")
    ap.add_argument("--limit", type=int, default=80, help="evaluation prompts (default 80)")
    ap.add_argument("--budget", type=float, default=0.25, help="fraction of the experts cached (default 0.25)")
    ap.add_argument("--link", default="ratio:1,rtx3090-pcie4-mixtral", help="comma list of links (default ratio:1,rtx3090-pcie4-mixtral)")
    ap.add_argument("--traces", default=None, help="pickle caching the recorded (warm, eval) traces")
    ap.add_argument("--out", required=True, help="JSON file for the results")
    a = ap.parse_args(argv)
    records = load_workload(Path(a.workload))
    if a.warm:
        warm, evals = split(load_workload(Path(a.warm)), 0.7, 0)[0], records
    else:
        warm, evals = split(records, 0.7, 0)
    warm, evals = warm[: a.warm_limit], evals[: a.limit]
    cache = Path(a.traces) if a.traces else None
    if cache is not None and cache.exists():
        with open(cache, "rb") as f:
            warm_t, eval_t = pickle.load(f)
        if [t.id for t in warm_t] != [r["id"] for r in warm] or [t.id for t in eval_t] != [r["id"] for r in evals]:
            raise SystemExit(f"--traces {cache}: not these prompts (ids differ)")
    else:
        rec = TraceRecorder(defaults.BUNDLED_MODEL, "cpu")
        warm_t = rec.record_all(warm, defaults.MAX_NEW_TOKENS, do_sample=True, seed=0, desc="warm-up traces")
        eval_t = rec.record_all(evals, defaults.MAX_NEW_TOKENS, do_sample=True, seed=0, desc="evaluation traces")
        rec.close()
        if cache is not None:
            with open(cache, "wb") as f:
                pickle.dump((warm_t, eval_t), f)
    L, J = len(warm_t[0].iterations[0].probs), warm_t[0].iterations[0].probs[0].shape[1]
    factory = PolicyFactory(build_store(warm_t, L, J, 1000, 3), request_eams(warm_t, L, J), (L, J, 2), 3)
    slots = int(a.budget * L * J)

    def hit_tpot(name, tuning=None):
        inputs = factory.inputs(name, access_trace(eval_t), True)
        if tuning is not None:
            inputs = dataclasses.replace(inputs, tuning=tuning)
        res = replay(make_policy(name, inputs.context(L, J, 2, slots, True)), eval_t, slots, ratio)
        return {"hit_rate": res.stats.hit_rate, "tpot_units": float(np.mean(res.iteration_units))}

    out = {"workload": Path(a.workload).name, "warm_prompts": len(warm_t), "eval_prompts": len(eval_t),
           "budget": a.budget, "links": {}}  # fmt: skip
    for link in [s.strip() for s in a.link.split(",") if s.strip()]:
        ratio = replay_ratio(link_config(link))
        rows = {"on-demand": hit_tpot("on-demand"), "oracle": hit_tpot("oracle")}
        for label, change in VARIANTS.items():
            tuning = FineMoETuning.paper() if change is None else FineMoETuning(**change)
            rows[f"finemoe ({label})"] = hit_tpot("finemoe", tuning)
        base, orc = rows["on-demand"], rows["oracle"]
        for r in rows.values():
            r["gap_closed"] = (r["hit_rate"] - base["hit_rate"]) / (orc["hit_rate"] - base["hit_rate"])
            r["tpot_vs_on_demand"] = r["tpot_units"] / base["tpot_units"]
        out["links"][link] = {"ratio": ratio, "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    for link, d in out["links"].items():
        for label, r in d["rows"].items():
            print(f"{link} {label}: hit {r['hit_rate']:.3f} gap {r['gap_closed']:+.2f} TPOT {r['tpot_vs_on_demand']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
