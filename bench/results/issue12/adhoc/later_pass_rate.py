"""Eviction's rate beyond the next pass (issue 12): hybrid's expected time to next use takes the
next-iteration model's probability q as the rate of every later pass; here q comes from a model
fitted on use at passes 2..K instead. Same splits as information_bound.py.
Usage: python later_pass_rate.py K (traces from record*.py in /tmp/em12)."""
import sys, time, pickle, pathlib; sys.path[:0] = ["/tmp/em12", str(pathlib.Path(__file__).parent)]
import numpy as np
from expertmap.bench.run import build_store
from expertmap.predictor.search import SearchIndex
from expertmap.predictor import next_use as nu
from exp import setup
from refit import compare
L, J = 8, 16
warm = pickle.load(open("/tmp/em12/warm.pkl", "rb"))
K = int(sys.argv[1]) if len(sys.argv) > 1 else 2   # passes 2..K
def data(traces, index):
    xs, gs, ys = [], [], []
    st = nu.NextUseState(L, J)
    for iterations, i, now in nu.positions(traces, index, st):
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
class LaterPassState(nu.NextUseState):
    """The rate of every pass after the next one from the passes-2..K model instead of q."""
    def next_use(self, model, distance=None):
        x, group, ahead = self.features()
        every = np.clip(model.probabilities(x), nu.EPS, 1 - 1e-6)
        p = every[np.arange(len(group)), group]
        r = np.clip(nu._sigmoid(np.einsum("nf,nf->n", x, W2[group])), nu.EPS, 1 - 1e-6)
        t = ahead + (1.0 - p) * self.L / r
        return p.reshape(self.L, self.J), t.reshape(self.L, self.J)
factory, evals = setup("tune", 40)
compare(f"q=passes2..{K}", lambda: LaterPassState(L, J), factory, evals)
