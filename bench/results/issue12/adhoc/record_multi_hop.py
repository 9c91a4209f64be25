"""Record dev_mix warm-up prompts 240-340 with multi-hop gates: layer l's router input through the
routers of layers l+2 and l+3, max over tokens, into /tmp/em13/hops.pkl (for multi_hop_gate.py).
Usage: WORKLOADS=<folder of the workload files> python record_multi_hop.py"""
import os, pickle, time
from pathlib import Path
from expertmap.actors import defaults
from expertmap.actors.trace_recorder import TraceRecorder
from expertmap.cluster.workload import load_workload, split
W = Path(os.environ["WORKLOADS"])  # the folder of workload files
recs = load_workload(W / "dev_mix.jsonl")
warm, _ = split(recs, 0.7, 0)
rec = TraceRecorder(defaults.BUNDLED_MODEL, "cpu")
rt = rec.engine.runtime
routers = rt._linear_routers()
xs = []
for row, moe in enumerate(rt.moe):
    moe.router.register_forward_pre_hook(lambda mod, args, row=row: xs.append((row, args[0].detach().float().numpy().reshape(-1, args[0].shape[-1]).copy())))
out = []
t0 = time.time()
for r in warm[240:340]:
    xs.clear()
    tr = rec.record(r, 32, True, 0)
    L = len(rt.moe)
    assert len(xs) == L * len(tr.iterations), (len(xs), len(tr.iterations))
    hops = []
    for i, it in enumerate(tr.iterations):
        h = {}
        for row in range(L):
            x = xs[i * L + row][1]
            for k in (2, 3):
                if row + k < L:
                    h[(row, k)] = routers[rt.moe[row + k].index](x).max(axis=0)
        hops.append(h)
    out.append((tr, hops))
print("recorded", len(out), round(time.time() - t0), flush=True)
pickle.dump(out, open("/tmp/em13/hops.pkl", "wb"))
rec.close()
