"""Hybrid's prediction work as a share of iteration time on the real engine, with its planner on a thread
(callbacks vs callbacks + planner CPU time) and inline (synchronous: all of it in the callbacks).
Usage: python prediction_cost.py instant,ratio:1,rtx3090-pcie4-mixtral hybrid 4 (traces from record*.py in /tmp/em12)."""
import sys; sys.path.insert(0, "/tmp/em12")
from exp import setup
from expertmap.actors.config import Budget, EngineConfig
from expertmap.actors.engine import OffloadEngine
from expertmap.actors.link_profiles import link_config
from expertmap.actors import defaults
factory, evals = setup("dev")
n = int(sys.argv[3]) if len(sys.argv) > 3 else 4
for linkname in sys.argv[1].split(","):
  for sync in (False, True):
    for name in sys.argv[2].split(","):
        eng = OffloadEngine(EngineConfig(model=defaults.BUNDLED_MODEL, device="cpu", policy=name, budget=Budget.parse("0.25"), link=link_config(linkname)),
                            factory.inputs(name, None, synchronous=sync))
        toks = 0
        for req in evals[:n]:
            ids = eng.tokenizer(req.prompt).input_ids[:256]
            g = eng.generate(ids, max_new_tokens=32, do_sample=True, seed=0); toks += len(g.token_ids)
        rt = eng.runtime
        pf = getattr(rt, "prediction_frac", float("nan"))
        print(f"{linkname:24s} {name:10s} {'inline' if sync else 'thread':6s} callbacks {rt.overhead_frac:6.2%} callbacks+planner {pf:6.2%} ms/iteration {rt.iterations_s / (rt.iteration if hasattr(rt,'iteration') else 1) * 1e3:7.2f} hit {eng.stats.hit_rate:.3f}", flush=True)
        eng.close()
