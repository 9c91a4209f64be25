"""Real-engine TPOT split into stall and the rest (compute, Python on the interpreter) per policy; CHUNKS=N sets the
link's chunk count. Usage: python stall_and_compute.py ratio:1 on-demand,hybrid 4 (traces from record*.py in /tmp/em12)."""
import sys; sys.path.insert(1, "/tmp/em12")
import numpy as np
from exp import setup
from expertmap.actors.config import Budget, EngineConfig
from expertmap.actors.engine import OffloadEngine
from expertmap.actors.link_profiles import link_config
from expertmap.actors import defaults
import os
from expertmap.actors import transfer as _tr
if os.environ.get("CHUNKS"): _tr.TransferEngine.chunks = int(os.environ["CHUNKS"])
factory, evals = setup("dev")
link = link_config(sys.argv[1]); n = int(sys.argv[3])
for name in sys.argv[2].split(","):
    eng = OffloadEngine(EngineConfig(model=defaults.BUNDLED_MODEL, device="cpu", policy=name, budget=Budget.parse("0.25"), link=link),
                        factory.inputs(name, None, synchronous=False))
    tp = []
    for req in evals[:n]:
        g = eng.generate(eng.tokenizer(req.prompt).input_ids[:256], max_new_tokens=32, do_sample=True, seed=0)
        tp += list(np.diff(g.iteration_times))
    s = eng.stats; print(f"{name:10s} TPOT {np.mean(tp)*1e3:6.2f} ms stall/it {s.stall_s / eng.runtime.iteration * 1e3:6.2f} ms layer {eng.layer_time_s*1e3:.2f} ms hit {eng.stats.hit_rate:.3f} callbacks {eng.overhead_frac:.2%} decisions {eng.decision_frac:.2%} process {eng.process_frac:.2%}", flush=True)
    eng.close()
