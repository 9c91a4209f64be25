"""Record the warm-up traces alone (dev_mix warm split 0..380) into /tmp/em12/warm.pkl, 20 prompts at a time."""
import os, pickle, time, torch
from pathlib import Path
from expertmap.actors import defaults
from expertmap.actors.trace_recorder import TraceRecorder
from expertmap.cluster.workload import load_workload, split
torch.set_num_threads(1)
W = Path(os.environ["WORKLOADS"])  # the folder of workload files
warm, _ = split(load_workload(W / "dev_mix.jsonl"), 0.7, 0)
warm = warm[:380]
rec = TraceRecorder(defaults.BUNDLED_MODEL, "cpu")
out = []
for i in range(0, len(warm), 20):
    out += rec.record_all(warm[i:i+20], 32, do_sample=True, seed=0, desc=f"warm{i}")
    pickle.dump(out, open("/tmp/em12/warm.pkl.tmp", "wb")); Path("/tmp/em12/warm.pkl.tmp").replace("/tmp/em12/warm.pkl")
    print(i + 20, time.time(), flush=True)
rec.close()
