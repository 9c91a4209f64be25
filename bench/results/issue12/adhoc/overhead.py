import sys; sys.path.insert(0, "/tmp/em12")
from exp import setup
from expertmap.actors.config import Budget, EngineConfig
from expertmap.actors.engine import OffloadEngine
from expertmap.actors.link_profiles import link_config
from expertmap.actors import defaults
factory, evals = setup("dev")
link = link_config(sys.argv[1])
for name in sys.argv[2].split(","):
    eng = OffloadEngine(EngineConfig(model=defaults.BUNDLED_MODEL, device="cpu", policy=name, budget=Budget.parse("0.25"), link=link),
                        factory.inputs(name, None, synchronous=False))
    for req in evals[:int(sys.argv[3])]:
        ids = eng.tokenizer(req.prompt).input_ids[:256]
        eng.generate(ids, max_new_tokens=32, do_sample=True, seed=0)
    print(name, f"overhead {eng.overhead_frac:.2%} hit {eng.stats.hit_rate:.3f}", flush=True)
    eng.close()
