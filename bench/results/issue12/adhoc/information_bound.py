"""How much better information would buy hybrid (issue 12, "what limits the rest"): refit the
next-use model with one oracle feature pair (value, log value) per (layer, expert) and replay.
MODE: embed (the next iteration's true token embedding, matched against the store: a perfect
next-token predictor), map (the next iteration's true map), cur (this iteration's true map),
both (this and the next iteration's). Store from warm-up prompts 0-240, fitted on 240-300, AUC on
300-340, replay on warm-up prompts 300-340 (the "tune" split), budget 25%, ratios 13.1 and 1.
Usage: python information_bound.py embed|map|cur|both (traces from record*.py in /tmp/em12)."""
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
MODE = sys.argv[1] if len(sys.argv) > 1 else "embed"
class SState(nu.NextUseState):
    flat = None; k = -1
    nxt = np.full((L, J), 1 / J)
    def start(self, iteration, index, embedding, tokens):
        super().start(iteration, index, embedding, tokens)
        self.k += 1
        if embedding is not None and self.flat is not None:
            assert np.allclose(self.flat[self.k].embedding, embedding), self.k
        if self.k + 1 < len(self.flat):
            n = self.flat[self.k + 1]
            if MODE == "embed" and index is not None:
                best, _ = index.semantic(np.asarray(n.embedding, np.float32)); self.nxt = index.maps[best]
            elif MODE == "map":
                self.nxt = n.expert_map()
            elif MODE == "both":
                self.nxt = n.expert_map(); self.cur = self.flat[self.k].expert_map()
        if MODE == "cur":
            self.nxt = self.flat[self.k].expert_map()
    def features(self):
        x, g, a = super().features()
        s = self.nxt.reshape(-1)
        cols = [s, np.log(s + 1e-3)]
        if MODE == "both":
            c = self.cur.reshape(-1); cols += [c, np.log(c + 1e-3)]
        return np.concatenate([x, np.stack(cols, axis=1)], axis=1), g, a
class XModel:
    def __init__(self, w): self._w = np.asarray(w)
    def probabilities(self, x): return nu._sigmoid(x @ self._w.T)
def fit(traces, index, S):
    xs, gs, ys = [], [], []
    iterations = [it for req in traces for it in req.iterations]
    st = S(L, J); st.flat = iterations
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
t0 = time.time()
idx = SearchIndex(*build_store(warm[:240], L, J, 1000, 3).arrays())
model, _ = fit(warm[240:300], idx, SState); print("fit", round(time.time() - t0), flush=True)
_, (x, g, y) = fit(warm[300:340], idx, SState)
p = model.probabilities(x)[np.arange(len(g)), g]
for k in range(3):
    s = g == k; yy, pp = y[s], p[s]
    order = np.argsort(pp); r = np.empty(len(pp)); r[order] = np.arange(len(pp))
    print("group", k, "AUC", round((r[yy == 1].mean() - (yy.sum() - 1) / 2) / (len(yy) - yy.sum()), 3), flush=True)
factory, evals = setup("tune", 40)
flat = [it for req in evals for it in req.iterations]
for r in (13.1, 1.0):
    base = run("on-demand", evals, factory, 32, r); orc = run("oracle", evals, factory, 32, r)
    shipped = run("hybrid", evals, factory, 32, r)
    inputs = factory.inputs("hybrid", access_trace(evals), True, None)
    pol = make_policy("hybrid", inputs.context(L, J, 2, 32, True, copy_layers=r))
    def mk():
        s = SState(L, J); s.flat = flat; return s
    core = pol.core
    orig_reset = core.reset
    def reset():
        orig_reset(); core.state = mk()
    core.reset = reset; core.reset(); core.model = model
    res = replay(pol, evals, 32, r)
    for label, hit, tp in (("shipped", shipped["hit"], shipped["tpot"]), (MODE, res.stats.hit_rate, float(np.mean(res.iteration_units)))):
        gap = (hit - base["hit"]) / (orc["hit"] - base["hit"])
        print(f"tune40 r={r} {label:10s} hit {hit:.3f} gap {gap:+.2f} tpot {tp / base['tpot']:.2f}x", flush=True)
