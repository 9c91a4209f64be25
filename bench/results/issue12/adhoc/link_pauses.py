"""How often a prefetch copy on the emulated link calls back between chunks (the worker waking), with hybrid at
ratio 1 on 3 prompts. Usage: python link_pauses.py (traces from record*.py in /tmp/em12)."""
import sys, collections; sys.path.insert(1, "/tmp/em12")
from exp import setup
from expertmap.actors.config import Budget, EngineConfig
from expertmap.actors.engine import OffloadEngine
from expertmap.actors.link_profiles import link_config
from expertmap.actors import defaults, transfer as tr
cnt = collections.Counter()
orig = tr.EmulatedLink.copy
def copy(self, slot, host, nbytes, between_chunks=None):
    cnt["copies"] += 1
    if between_chunks is not None:
        cnt["prefetch copies"] += 1
        def bc():
            cnt["pauses"] += 1; between_chunks()
        return orig(self, slot, host, nbytes, bc)
    return orig(self, slot, host, nbytes, None)
tr.EmulatedLink.copy = copy
factory, evals = setup("dev")
eng = OffloadEngine(EngineConfig(model=defaults.BUNDLED_MODEL, device="cpu", policy="hybrid", budget=Budget.parse("0.25"), link=link_config("ratio:1")),
                    factory.inputs("hybrid", None, synchronous=False))
for req in evals[:3]:
    eng.generate(eng.tokenizer(req.prompt).input_ids[:256], max_new_tokens=32, do_sample=True, seed=0)
s = eng.stats
print(dict(cnt), "hit", round(s.hit_rate, 3), "prefetched", s.prefetched, "used", s.prefetch_used, "late", getattr(s, "late", None))
eng.close()
