"""How much better information would buy hybrid (issue 12, "what limits the rest"): refit the
next-use model with one oracle feature pair (value, log value) per (layer, expert) and replay.
MODE: embed (the next iteration's true token embedding, matched against the store: a perfect
next-token predictor), map (the next iteration's true map), cur (this iteration's true map),
both (this and the next iteration's). Store from warm-up prompts 0-240, fitted on 240-300, AUC on
300-340, replay on warm-up prompts 300-340 (the "tune" split), budget 25%, ratios 13.1 and 1.
Usage: python information_bound.py embed|map|cur|both (traces from record*.py in /tmp/em12)."""
import sys, time, pickle, pathlib; sys.path[:0] = ["/tmp/em12", str(pathlib.Path(__file__).parent)]
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
def state_for(traces):
    st = SState(L, J); st.flat = [it for req in traces for it in req.iterations]; return st
t0 = time.time()
idx = SearchIndex(*build_store(warm[:240], L, J, 1000, 3).arrays())
model = fit(*samples(warm[240:300], idx, state_for(warm[240:300]))); print("fit", round(time.time() - t0), flush=True)
print("AUC per group", auc(model, *samples(warm[300:340], idx, state_for(warm[300:340]))), flush=True)
factory, evals = setup("tune", 40)
for r in (13.1, 1.0):
    base = run("on-demand", evals, factory, 32, r); orc = run("oracle", evals, factory, 32, r)
    shipped = run("hybrid", evals, factory, 32, r)
    pol = make_policy("hybrid", factory.inputs("hybrid", access_trace(evals), True, None).context(L, J, 2, 32, True, copy_layers=r))
    row = replay_with(pol, lambda: state_for(evals), model, evals, 32, r)
    for label, x_ in (("shipped", shipped), (MODE, row)):
        print(gap_line(label, x_, base, orc, ratio=r), flush=True)
