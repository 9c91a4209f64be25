"""Each compute-thread callback of hybrid: calls per iteration, wall and CPU microseconds per call
(prefill iterations included), on the real engine. Usage: WORKLOADS=... python callback_cost.py
ratio:1,rtx3090-pcie4-mixtral (warm-up traces cached by critical_path.py in /tmp/em14)."""
import os
import pickle, sys, time
from collections import defaultdict
from pathlib import Path
import torch; torch.set_num_threads(1)
from expertmap.actors import defaults
from expertmap.actors.config import Budget, EngineConfig
from expertmap.actors.engine import OffloadEngine
from expertmap.actors.link_profiles import link_config
from expertmap.bench.run import PolicyFactory, build_store, request_eams
from expertmap.cluster.workload import load_workload, split
W = Path(os.environ["WORKLOADS"])  # the folder of workload files
warm_r, eval_r = split(load_workload(W / "dev_mix.jsonl"), 0.7, 0)
warm = pickle.load(open("/tmp/em14/warm40.pkl", "rb"))
L = len(warm[0].iterations[0].probs); J = warm[0].iterations[0].probs[0].shape[1]
factory = PolicyFactory(build_store(warm, L, J, 1000, 3), request_eams(warm, L, J), (L, J, 2), 3)
for linkname in sys.argv[1].split(","):
    eng = OffloadEngine(EngineConfig(model=defaults.BUNDLED_MODEL, device="cpu", policy="hybrid", budget=Budget.parse("0.25"), link=link_config(linkname)),
                        factory.inputs("hybrid", None, synchronous=False), layer_time_s=1.2e-3)
    rt = eng.runtime; acc = defaultdict(lambda: [0, 0.0, 0.0])
    orig = rt._timed
    def timed(fn, *args):
        t0, c0 = time.perf_counter(), time.thread_time()
        orig(fn, *args)
        a = acc[fn.__name__]; a[0] += 1; a[1] += time.perf_counter() - t0; a[2] += time.thread_time() - c0
    rt._timed = timed
    for req in eval_r[:2]:
        eng.generate(eng.tokenizer(req["prompt"]).input_ids[:256], max_new_tokens=32, do_sample=True, seed=0)
    its = rt.iteration + 1
    print(linkname, "iteration ms", round(rt.iterations_s / its * 1e3, 1), "callbacks", f"{eng.overhead_frac:.2%}")
    for k, (n, w, c) in acc.items():
        print(f"   {k:20s} calls/it {n/its:5.1f}  wall us/call {w/n*1e6:7.1f}  cpu us/call {c/n*1e6:7.1f}")
    eng.close()
