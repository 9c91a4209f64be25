"""Real engine (emulated link): TPOT, hit rate, stall, compute-thread CPU, not-stalled time and waiting,
and the planner process's whole CPU time (/proc: its polling included). PIN=1 puts the compute thread
alone on core 0, every other thread and the process on core 1.
Usage: WORKLOADS=... python critical_path.py LINK POLICIES N (warm-up traces cached in /tmp/em14)."""
import os, pickle, sys
from pathlib import Path
import numpy as np
import torch
torch.set_num_threads(1)
from expertmap.actors import defaults
from expertmap.actors.config import Budget, EngineConfig
from expertmap.actors.engine import OffloadEngine
from expertmap.actors.link_profiles import link_config
from expertmap.actors.trace_recorder import TraceRecorder
from expertmap.bench.run import PolicyFactory, build_store, request_eams
from expertmap.cluster.workload import load_workload, split
W = Path(os.environ["WORKLOADS"])  # the folder of workload files
warm_r, eval_r = split(load_workload(W / "dev_mix.jsonl"), 0.7, 0)
cache = Path("/tmp/em14/warm40.pkl"); cache.parent.mkdir(exist_ok=True)
if not cache.exists():
    rec = TraceRecorder(defaults.BUNDLED_MODEL, "cpu"); pickle.dump(rec.record_all(warm_r[:40], 32, do_sample=True, seed=0), cache.open("wb")); rec.close()
warm = pickle.load(cache.open("rb"))
L = len(warm[0].iterations[0].probs); J = warm[0].iterations[0].probs[0].shape[1]
factory = PolicyFactory(build_store(warm, L, J, 1000, 3), request_eams(warm, L, J), (L, J, 2), 3)
link = link_config(sys.argv[1]); n = int(sys.argv[3])
def child_cpu(policy):
    r = getattr(policy, "remote", None)
    if r is None: return 0.0
    f = open(f"/proc/{r._proc.pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
PIN = os.environ.get("PIN") == "1"  # the compute thread alone on core 0; every other thread and the child on core 1
for name in sys.argv[2].split(","):
    if PIN: os.sched_setaffinity(0, {1})
    eng = OffloadEngine(EngineConfig(model=defaults.BUNDLED_MODEL, device="cpu", policy=name, budget=Budget.parse("0.25"), link=link),
                        factory.inputs(name, None, synchronous=False))
    if PIN: os.sched_setaffinity(0, {0})
    tp = []
    c0 = child_cpu(eng.runtime.policy)
    for req in eval_r[:n]:
        g = eng.generate(eng.tokenizer(req["prompt"]).input_ids[:256], max_new_tokens=32, do_sample=True, seed=0)
        tp += list(np.diff(g.iteration_times))
    rt = eng.runtime; it = rt.iterations_s
    print(f"{name:10s} TPOT {np.mean(tp)*1e3:6.2f} ms hit {eng.stats.hit_rate:.3f} stall {eng.stats.stall_s/it:.1%} cpu {rt.iterations_cpu_s/it:.1%} "
          f"unstalled {rt.unstalled_s*1e3:.1f} ms waiting {eng.waiting_frac:.1%} callbacks {eng.overhead_frac:.2%} decisions {eng.decision_frac:.2%} process(apply) {eng.process_frac:.1%} "
          f"child all {(child_cpu(rt.policy) - c0)/it:.1%}", flush=True)
    eng.close()
