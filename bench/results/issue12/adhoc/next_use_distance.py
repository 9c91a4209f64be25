"""An LRB-style eviction order for hybrid (issue 12): regress the log of each expert's next-use
distance (layers until its next use, censored at H iterations) on the next-use features, and let
hybrid evict, admit and order prefetches by the predicted distance instead of
``ahead + (1 - p) L / q``. Store from warm-up prompts 0-240, fitted on 240-300, replay on 300-340
(the "tune" split of information_bound.py), budget 25%, ratios 13.1 and 1.
Usage: python next_use_distance.py [linear|gbm] [H] [tune|dev|other] (traces from record*.py in
/tmp/em12; dev and other: the held-out evaluations, store from warm-up prompts 0-300)."""
import os, sys, time, pickle, pathlib; sys.path[:0] = ["/tmp/em12", str(pathlib.Path(__file__).parent)]
import numpy as np
from expertmap.bench.run import build_store
from expertmap.predictor.search import SearchIndex
from expertmap.predictor import next_use as nu
from expertmap.predictor.next_use_distance import _next_pass
from exp import setup
from refit import compare
L, J = 8, 16
KIND = sys.argv[1] if len(sys.argv) > 1 else "linear"
H = int(sys.argv[2]) if len(sys.argv) > 2 else 8  # censoring horizon, iterations
EVAL = sys.argv[3] if len(sys.argv) > 3 else "tune"
warm = pickle.load(open("/tmp/em12/warm.pkl", "rb"))


def design(x, group, ahead):
    """The regression's columns. Linear: the features, each group's own copy of them, the log
    distance in layers to the expert's pass. Trees split on the group themselves: the features,
    the group, the log distance."""
    if KIND != "linear":
        return np.concatenate([x, group[:, None], np.log(ahead)[:, None]], axis=1)
    g = np.eye(3)[group]  # [N, 3]
    return np.concatenate([x, (x[:, :, None] * g[:, None, :]).reshape(len(x), -1), np.log(ahead)[:, None]], axis=1)


def samples(traces, index):
    xs, ys = [], []
    state = nu.NextUseState(L, J)
    layer_of = np.repeat(np.arange(L), J)
    nxt = None
    for iterations, i, now in nu.positions(traces, index, state):
        if nxt is None:
            nxt = _next_pass(iterations, L, J)
        if i + H >= len(iterations):
            continue  # the horizon runs past the traces: no label
        first = np.where(layer_of > now, i, i + 1)  # [L*J] the iteration of each expert's next pass
        use = nxt[np.minimum(first, len(iterations)), layer_of, np.tile(np.arange(J), L)]  # [L*J]
        x, group, ahead = state.features()
        d = ahead + L * np.minimum(use - first, H).astype(np.float64)  # censored at H passes
        xs.append(design(x, group, ahead).astype(np.float32)); ys.append(np.log(d))
    return np.concatenate(xs), np.concatenate(ys)


class DistanceState(nu.NextUseState):
    predictor = None

    def next_use(self, model, distance=None):
        p, _ = super().next_use(model)  # p still gates the plan (min_p)
        x, group, ahead = self.features()
        t = np.exp(self.predictor(design(x, group, ahead)))
        return p, np.maximum(t, ahead).reshape(self.L, self.J)


t0 = time.time()
idx = SearchIndex(*build_store(warm[:240], L, J, 1000, 3).arrays())
X, y = samples(warm[240:300], idx)
print("samples", X.shape, "fit on", KIND, flush=True)
LABEL = KIND
if KIND == "linear":
    w, *_ = np.linalg.lstsq(np.asarray(X, np.float64), y, rcond=None)
    predict = lambda a: a @ w  # noqa: E731
else:
    from sklearn.ensemble import HistGradientBoostingRegressor
    sub = np.random.default_rng(0).choice(len(X), min(len(X), 600_000), replace=False)
    trees, leaves = int(os.environ.get("TREES", 200)), int(os.environ.get("LEAVES", 31))
    gbm = HistGradientBoostingRegressor(max_iter=trees, learning_rate=0.1, max_leaf_nodes=leaves).fit(X[sub], y[sub])
    LABEL = f"gbm {trees}x{leaves}"
    predict = gbm.predict
Xe, ye = samples(warm[300:340], idx)
pe = predict(Xe)
print(f"fit {time.time() - t0:.0f}s; held-out log-distance R2 {1 - ((ye - pe) ** 2).mean() / ye.var():.3f}", flush=True)
DistanceState.predictor = staticmethod(predict)
factory, evals = setup(EVAL, 40 if EVAL == "tune" else None)
compare(f"distance {LABEL} H={H}", lambda: DistanceState(L, J), factory, evals, tag=f"{EVAL}{len(evals)}")
