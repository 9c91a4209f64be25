"""Replay experiments for issue 12 on cached traces."""
import argparse, dataclasses, pickle, time
import numpy as np
from expertmap.bench.run import build_store, PolicyFactory, request_eams
from expertmap.bench.simulator import access_trace, replay
from expertmap.bench.attribution import attributed_replay
from expertmap.predictor.policies import make_policy

def load(evalset):
    warm = pickle.load(open("/tmp/em12/warm.pkl", "rb"))
    if evalset == "tune":
        return warm[:300], warm[300:380]
    return warm[:300], pickle.load(open("/tmp/em12/traces.pkl", "rb"))[evalset]

def run(name, evals, factory, slots, ratio, tuning=None, prefetch=True, attrib=False, distance=None):
    inputs = factory.inputs(name, access_trace(evals), True, distance)
    if tuning is not None:
        inputs = dataclasses.replace(inputs, tuning=tuning)
    L, J, k = factory.shape
    pol = make_policy(name, inputs.context(L, J, k, slots, prefetch, copy_layers=ratio))
    t0 = time.perf_counter()
    if attrib:
        res, att = attributed_replay(pol, evals, slots, ratio)
    else:
        res, att = replay(pol, evals, slots, ratio), None
    return {"hit": res.stats.hit_rate, "tpot": float(np.mean(res.iteration_units)), "wall": time.perf_counter() - t0,
            "att": att.to_dict() if att else None}

def setup(evalset, limit=None):
    warm, evals = load(evalset)
    if limit: evals = evals[:limit]
    import os
    if os.environ.get("LIMIT"): evals = evals[:int(os.environ["LIMIT"])]
    L = len(warm[0].iterations[0].probs); J = warm[0].iterations[0].probs[0].shape[1]
    store = build_store(warm, L, J, 1000, 3)
    return PolicyFactory(store, request_eams(warm, L, J), (L, J, 2), 3), evals

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--eval", default="dev")
    ap.add_argument("--policies", default="on-demand,oracle,finemoe,hybrid")
    ap.add_argument("--ratios", default="1,13.1")
    ap.add_argument("--limit", type=int, default=None)
    a = ap.parse_args()
    factory, evals = setup(a.eval, a.limit)
    for r in map(float, a.ratios.split(",")):
        rows = {p: run(p, evals, factory, 32, r) for p in a.policies.split(",")}
        base, orc = rows["on-demand"], rows["oracle"]
        for p, x in rows.items():
            gap = (x["hit"] - base["hit"]) / (orc["hit"] - base["hit"])
            print(f"{a.eval} r={r} {p:20s} hit {x['hit']:.3f} gap {gap:+.2f} tpot {x['tpot']/base['tpot']:.2f}x wall {x['wall']:.1f}s", flush=True)
