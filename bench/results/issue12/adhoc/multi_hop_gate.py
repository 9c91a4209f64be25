"""Multi-hop gates (layer l's router input through the routers of l+2 and l+3) as next-use features:
refit on warm-up prompts 240-300 (record_multi_hop.py), AUC and replay on 300-340 (issue 12).
Usage: python multi_hop_gate.py"""
import sys, time, pickle; sys.path.insert(0, "/tmp/em12")
import numpy as np
from expertmap.bench.run import build_store
from expertmap.bench.simulator import access_trace, replay
from expertmap.predictor.search import SearchIndex
from expertmap.predictor import next_use as nu
from expertmap.predictor.policies import make_policy
from exp import setup, run
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
class XModel:
    def __init__(self, w): self._w = np.asarray(w)
    def probabilities(self, x): return nu._sigmoid(x @ self._w.T)
def fit(traces, hops, index, S):
    xs, gs, ys = [], [], []
    iterations = [it for req in traces for it in req.iterations]
    st = S(L, J); st.hops = hops
    for i, it in enumerate(iterations):
        st.start(i, index, it.embedding, it.num_tokens)
        for now in range(-1, L):
            if now >= 0:
                gate = it.next_gate[now]
                st.router(now, it.probs[now].mean(axis=0), None if gate is None else gate.max(axis=0)); st.used(now, it.selected[now])
            if i + 1 >= len(iterations): continue
            label = np.zeros((L, J))
            for layer in range(L):
                src = i if layer > now else i + 1
                label[layer, iterations[src].selected[layer]] = 1.0
            x, g, _ = st.features(); xs.append(x.astype(np.float32)); gs.append(g); ys.append(label.reshape(-1))
    x, g, y = np.concatenate(xs), np.concatenate(gs), np.concatenate(ys)
    return XModel([nu._logistic(x[g == k].astype(np.float64), y[g == k], 1.0, 25) for k in range(3)]), (x, g, y)
def auc(model, x, g, y, cols=None):
    p = model.probabilities(x)[np.arange(len(g)), g]; out = []
    for k in range(3):
        s = g == k; yy, pp = y[s], p[s]
        order = np.argsort(pp); r = np.empty(len(pp)); r[order] = np.arange(len(pp))
        out.append(round((r[yy == 1].mean() - (yy.sum() - 1) / 2) / (len(yy) - yy.sum()), 3))
    return out
idx = SearchIndex(*build_store(warm[:240], L, J, 1000, 3).arrays())
model, _ = fit(fit_tr, fit_h, idx, HState)
base_model, _ = fit(fit_tr, fit_h, idx, nu.NextUseState)
_, (x, g, y) = fit(eval_tr, eval_h, idx, HState)
_, (xb, gb, yb) = fit(eval_tr, eval_h, idx, nu.NextUseState)
print("AUC refit base", auc(base_model, xb, gb, yb), "hops", auc(model, x, g, y), flush=True)
factory, _ = setup("tune", 40)
evals = eval_tr
for r in (1.0, 13.1):
    base = run("on-demand", evals, factory, 32, r); orc = run("oracle", evals, factory, 32, r)
    rows = {"shipped": run("hybrid", evals, factory, 32, r)}
    for label, S, M in (("refit base", nu.NextUseState, base_model), ("hops", HState, model)):
        inputs = factory.inputs("hybrid", access_trace(evals), True, None)
        pol = make_policy("hybrid", inputs.context(L, J, 2, 32, True, copy_layers=r))
        core = pol.core; orig_reset = core.reset
        def reset(core=core, orig_reset=orig_reset, S=S):
            orig_reset(); st = S(L, J); st.hops = eval_h; core.state = st
        core.reset = reset; core.reset(); core.model = M
        res = replay(pol, evals, 32, r)
        rows[label] = {"hit": res.stats.hit_rate, "tpot": float(np.mean(res.iteration_units))}
    for label, x_ in rows.items():
        gap = (x_["hit"] - base["hit"]) / (orc["hit"] - base["hit"])
        print(f"tune40 r={r} {label:12s} hit {x_['hit']:.3f} gap {gap:+.2f} tpot {x_['tpot'] / base['tpot']:.2f}x", flush=True)
