"""Where hybrid's work lands on the serving interpreter (real engine, emulated link): the callbacks, the
policy's own threads, the cache worker's decisions, and the planner process (another core).
Usage: python interpreter_share.py ratio:1 on-demand,hybrid 4 (traces from record*.py in /tmp/em12)."""
import sys; sys.path.insert(1, "/tmp/em12")
from exp import setup
from expertmap.actors.config import Budget, EngineConfig
from expertmap.actors.engine import OffloadEngine
from expertmap.actors.link_profiles import link_config
from expertmap.actors import defaults
factory, evals = setup("dev")
link = link_config(sys.argv[1]); n = int(sys.argv[3])
for name in sys.argv[2].split(","):
    eng = OffloadEngine(EngineConfig(model=defaults.BUNDLED_MODEL, device="cpu", policy=name, budget=Budget.parse("0.25"), link=link),
                        factory.inputs(name, None, synchronous=False))
    for req in evals[:n]:
        ids = eng.tokenizer(req.prompt).input_ids[:256]
        eng.generate(ids, max_new_tokens=32, do_sample=True, seed=0)
    rt = eng.runtime
    print(f"{name:10s} ms/it {rt.iterations_s/rt.iteration*1e3:6.2f} hit {eng.stats.hit_rate:.3f} callbacks {eng.overhead_frac:.2%} +threads {eng.prediction_frac:.2%} decisions {eng.decision_frac:.2%} process {eng.process_frac:.2%}", flush=True)
    eng.close()
