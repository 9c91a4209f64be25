"""Issue 12, same splits as information_bound.py. Eviction as 'predicted sets + LRU beyond': experts whose next pass uses them with p >= theta rank by
their layer distance; the rest after them, least recently used first (adhoc).
Usage: python set_rule.py"""
import sys; sys.path.insert(0, "/tmp/em12")
import numpy as np
from expertmap.predictor import next_use as nu
from exp import setup, run
orig = nu.NextUseState.next_use
def make(theta, mode):
    def next_use(self, model, distance=None):
        x, group, ahead = self.features()
        every = np.clip(model.probabilities(x), nu.EPS, 1 - 1e-6)
        p = every[np.arange(len(group)), group]
        q = every[:, 2]
        t = ahead + (1.0 - p) * self.L / q
        age = np.maximum(0.0, self.iteration - self.last_use.reshape(-1))
        if mode == "lru":
            t = np.where(p >= theta, ahead, 1e4 + ahead + self.L * np.minimum(age, 1e3))
        elif mode == "tie":
            t = np.where(p >= theta, t, 1e4 + t + self.L * np.minimum(age, 1e3))
        return p.reshape(self.L, self.J), t.reshape(self.L, self.J)
    return next_use
factory, evals = setup("tune", 40)
for r in (13.1, 1.0):
    base = run("on-demand", evals, factory, 32, r); orc = run("oracle", evals, factory, 32, r)
    nu.NextUseState.next_use = orig
    rows = {"shipped": run("hybrid", evals, factory, 32, r)}
    for mode in ("lru", "tie"):
        for theta in (0.2, 0.35, 0.5):
            nu.NextUseState.next_use = make(theta, mode)
            rows[f"{mode} theta={theta}"] = run("hybrid", evals, factory, 32, r)
    for label, x_ in rows.items():
        gap = (x_["hit"] - base["hit"]) / (orc["hit"] - base["hit"])
        print(f"tune40 r={r} {label:16s} hit {x_['hit']:.3f} gap {gap:+.2f} tpot {x_['tpot'] / base['tpot']:.2f}x", flush=True)
