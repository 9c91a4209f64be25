"""Eviction's rate beyond the next pass (issue 12): hybrid's expected time to next use takes the
next-iteration model's probability q as the rate of every later pass; here q comes from a model
fitted on use at passes 2..K instead. Same splits as information_bound.py.
Usage: python later_pass_rate.py K (traces from record*.py in /tmp/em12)."""
import sys, time, pickle; sys.path.insert(0, "/tmp/em12")
import numpy as np
from expertmap.bench.run import build_store
from expertmap.bench.simulator import access_trace, replay
from expertmap.predictor.search import SearchIndex
from expertmap.predictor import next_use as nu
from expertmap.predictor.policies import make_policy
from expertmap.predictor.policies.hybrid import DEFAULT_MODEL
from exp import setup, run
L, J = 8, 16
warm = pickle.load(open("/tmp/em12/warm.pkl", "rb"))
K = int(sys.argv[1]) if len(sys.argv) > 1 else 2   # passes 2..K
def data(traces, index):
    xs, gs, ys = [], [], []
    iterations = [it for req in traces for it in req.iterations]
    st = nu.NextUseState(L, J)
    for i, it in enumerate(iterations):
        st.start(i, index, it.embedding, it.num_tokens)
        for now in range(-1, L):
            if now >= 0:
                gate = it.next_gate[now]
                st.router(now, it.probs[now].mean(axis=0), None if gate is None else gate.max(axis=0)); st.used(now, it.selected[now])
            if i + K >= len(iterations): continue
            label = np.zeros((L, J))
            for layer in range(L):
                first = i + 1 if layer > now else i + 2   # the pass after next
                for src in range(first, first + K - 1):
                    label[layer, iterations[src].selected[layer]] += 1.0 / (K - 1)
            x, g, _ = st.features(); xs.append(x.astype(np.float32)); gs.append(g); ys.append(label.reshape(-1))
    return np.concatenate(xs), np.concatenate(gs), np.concatenate(ys)
t0 = time.time()
idx = SearchIndex(*build_store(warm[:240], L, J, 1000, 3).arrays())
x, g, y = data(warm[240:300], idx)
W2 = np.asarray([nu._logistic(x[g == k].astype(np.float64), y[g == k], 1.0, 25) for k in range(3)])
print("fit", round(time.time() - t0), flush=True)
orig_next_use = nu.NextUseState.next_use
def next_use(self, model):
    x, group, ahead = self.features()
    every = np.clip(model.probabilities(x), nu.EPS, 1 - 1e-6)
    p = every[np.arange(len(group)), group]
    r = np.clip(nu._sigmoid(np.einsum("nf,nf->n", x, W2[group])), nu.EPS, 1 - 1e-6)
    t = ahead + (1.0 - p) * self.L / r
    return p.reshape(self.L, self.J), t.reshape(self.L, self.J)
factory, evals = setup("tune", 40)
for r in (13.1, 1.0):
    base = run("on-demand", evals, factory, 32, r); orc = run("oracle", evals, factory, 32, r)
    nu.NextUseState.next_use = orig_next_use
    a = run("hybrid", evals, factory, 32, r)
    nu.NextUseState.next_use = next_use
    b = run("hybrid", evals, factory, 32, r)
    for label, x_ in (("shipped", a), (f"q=passes2..{K}", b)):
        gap = (x_["hit"] - base["hit"]) / (orc["hit"] - base["hit"])
        print(f"tune40 r={r} {label:14s} hit {x_['hit']:.3f} gap {gap:+.2f} tpot {x_['tpot'] / base['tpot']:.2f}x", flush=True)
