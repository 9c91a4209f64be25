"""Record traces once for issue-12 iteration: warm (dev_mix warm split 0..380), dev eval, other eval."""
import os, pickle, time
from pathlib import Path
from expertmap.actors import defaults
from expertmap.actors.trace_recorder import TraceRecorder
from expertmap.cluster.workload import load_workload, split

W = Path(os.environ["WORKLOADS"])  # the folder of workload files
recs = load_workload(W / "dev_mix.jsonl")
warm, evals = split(recs, 0.7, 0)
warm, dev_eval = warm[:380], evals[:80]
others = sorted(p for p in W.glob("*.jsonl") if p.name != "dev_mix.jsonl")
other = []
per = 6
for p in others:
    other += load_workload(p)[:: max(1, 97)][:per]  # a spread sample of each file
other = other[:80]
rec = TraceRecorder(defaults.BUNDLED_MODEL, "cpu")
out = {}
for name, rs in (("other", other), ("dev", dev_eval), ("warm", warm)):
    t0 = time.time()
    out[name] = rec.record_all(rs, 32, do_sample=True, seed=0, desc=name)
    print(name, len(rs), time.time() - t0, flush=True)
    pickle.dump(out, open("/tmp/em12/traces.pkl", "wb"))
rec.close()
