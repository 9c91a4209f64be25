"""Multi-hop gates (layer l's router input through the routers of l+2 and l+3) as next-use features:
refit on warm-up prompts 240-300 (record_multi_hop.py), AUC and replay on 300-340 (issue 12).
Usage: python multi_hop_gate.py"""
import sys, pickle, pathlib; sys.path[:0] = ["/tmp/em12", str(pathlib.Path(__file__).parent)]
import numpy as np
from expertmap.bench.run import build_store
from expertmap.bench.simulator import access_trace
from expertmap.predictor.search import SearchIndex
from expertmap.predictor import next_use as nu
from expertmap.predictor.policies import make_policy
from exp import setup, run
from refit import auc, fit, gap_line, replay_with, samples
L, J = 8, 16
warm = pickle.load(open("/tmp/em12/warm.pkl", "rb"))
data = pickle.load(open("/tmp/em13/hops.pkl", "rb"))
fit_tr, eval_tr = [t for t, _ in data[:60]], [t for t, _ in data[60:]]
fit_h = [h for _, hs in data[:60] for h in hs]; eval_h = [h for _, hs in data[60:] for h in hs]
class HState(nu.NextUseState):
    hops = None; k = -1
    def start(self, iteration, index, embedding, tokens):
        super().start(iteration, index, embedding, tokens); self.k += 1
    def features(self):
        x, g, a = super().features()
        hop = np.zeros((L, J)); has = np.zeros((L, J))
        if self.now >= 0:
            h = self.hops[self.k]
            for k in (2, 3):
                if (self.now, k) in h:
                    hop[self.now + k] = h[(self.now, k)]; has[self.now + k] = 1
        hop, has = hop.reshape(-1), has.reshape(-1)
        return np.concatenate([x, np.stack([hop, np.log(hop + 1e-3) * has, has], axis=1)], axis=1), g, a
def state(S, hops):
    st = S(L, J); st.hops = hops; return st
idx = SearchIndex(*build_store(warm[:240], L, J, 1000, 3).arrays())
model = fit(*samples(fit_tr, idx, state(HState, fit_h)))
base_model = fit(*samples(fit_tr, idx, state(nu.NextUseState, fit_h)))
print("AUC refit base", auc(base_model, *samples(eval_tr, idx, state(nu.NextUseState, eval_h))),
      "hops", auc(model, *samples(eval_tr, idx, state(HState, eval_h))), flush=True)
factory, _ = setup("tune", 40)
evals = eval_tr
for r in (1.0, 13.1):
    base = run("on-demand", evals, factory, 32, r); orc = run("oracle", evals, factory, 32, r)
    rows = {"shipped": run("hybrid", evals, factory, 32, r)}
    for label, S, M in (("refit base", nu.NextUseState, base_model), ("hops", HState, model)):
        pol = make_policy("hybrid", factory.inputs("hybrid", access_trace(evals), True, None).context(L, J, 2, 32, True, copy_layers=r))
        rows[label] = replay_with(pol, lambda S=S: state(S, eval_h), M, evals, 32, r)
    for label, x_ in rows.items():
        print(gap_line(label, x_, base, orc, ratio=r), flush=True)
