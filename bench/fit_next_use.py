"""Fit `hybrid`'s next-use model (predictor/next_use.py) on warm-up traces, never on evaluation ones.

    python -m expertmap.bench.fit_next_use --workload $WORKLOADS/dev_mix.jsonl \
        --out bench/results/issue12/fit.json

The warm-up prompts are the bench's: the first ``--store-prompts + --fit-prompts +
--holdout-prompts`` of the 70% split (seed 0) of ``--workload``. The first ``--store-prompts``
fill the map store the searches run against; the model is fitted on the next ``--fit-prompts``
(so a search never finds the very iteration it is asked about) and evaluated on the last
``--holdout-prompts`` (store: every earlier prompt). Writes the weights (``NextUseModel``) and,
per group, log loss, the base rate's log loss and ROC AUC on the fitting and held-out prompts.

``--distance FILE`` also fits the next-use distance model (predictor/next_use_distance.py) on the
same prompts, gradient-boosted trees from scikit-learn (``HistGradientBoostingRegressor``, the
bench extra), and writes it to FILE in the format the product reads with NumPy alone; its R2 on
the held-out prompts goes into ``--out``. A model folder holding FILE as ``next_use_distance.json``
gives hybrid its eviction order.
"""

from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path

import numpy as np

from expertmap.actors import defaults
from expertmap.actors.config import require_model_folder
from expertmap.predictor.next_use import FEATURES, GROUPS, fit_next_use, walk
from expertmap.predictor.next_use_distance import COLUMNS, DistanceModel, training_rows
from expertmap.predictor.search import SearchIndex


def index_of(traces, num_layers, num_experts, capacity=1000, distance=3) -> SearchIndex:
    from expertmap.bench.run import build_store

    store = build_store(traces, num_layers, num_experts, capacity, distance)
    return SearchIndex(*store.arrays())


def evaluate(model, traces, index, num_layers, num_experts) -> dict:
    """Per group: log loss, the base rate's log loss, and the ROC AUC of the model's probability."""
    ps, ys = [[] for _ in GROUPS], [[] for _ in GROUPS]
    for state, label in walk(traces, index, num_layers, num_experts):
        x, group, _ = state.features()
        p = model.probability(x, group)
        for g in range(len(GROUPS)):
            ps[g].append(p[group == g])
            ys[g].append(label[group == g])
    out = {}
    for g, name in enumerate(GROUPS):
        p, y = np.clip(np.concatenate(ps[g]), 1e-4, 1 - 1e-4), np.concatenate(ys[g])
        m = float(y.mean())
        ranks = np.empty(len(p))
        ranks[np.argsort(p, kind="stable")] = np.arange(len(p))
        pos = y.sum()
        auc = float((ranks[y == 1].sum() - pos * (pos - 1) / 2) / max(1.0, pos * (len(y) - pos)))
        out[name] = {"rows": int(len(y)), "use_rate": m, "auc": auc,
                     "log_loss": float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()),
                     "base_log_loss": float(-(m * np.log(m) + (1 - m) * np.log(1 - m))) if 0 < m < 1 else 0.0}  # fmt: skip
    return out


def distance_rows(traces, index, num_layers, num_experts, horizon) -> tuple[np.ndarray, np.ndarray]:
    rows = list(training_rows(traces, index, num_layers, num_experts, horizon))
    if not rows:
        raise SystemExit(f"--distance: the prompts hold no position {horizon} iterations before their end")
    return np.concatenate([x for x, _ in rows]).astype(np.float32), np.concatenate([y for _, y in rows])


def fit_distance(x, y, horizon: int, trees: int = 50, leaves: int = 15, max_rows: int = 600_000) -> dict:
    """Boosted trees on log(layers to next use), as the file ``DistanceModel.from_file`` reads."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    if len(x) > max_rows:  # a fixed sample: the fit's time, not its result, grows past this
        pick = np.random.default_rng(0).choice(len(x), max_rows, replace=False)
        x, y = x[pick], y[pick]
    gbm = HistGradientBoostingRegressor(max_iter=trees, max_leaf_nodes=leaves, learning_rate=0.1,
                                        early_stopping=False, random_state=0).fit(x, y)  # fmt: skip
    return {"columns": list(COLUMNS), "baseline": float(np.ravel(gbm._baseline_prediction)[0]),
            "horizon": horizon, "trees": [_tree(p) for (p,) in gbm._predictors]}  # fmt: skip


def _tree(predictor) -> dict:
    """One fitted tree's nodes (scikit-learn's ``TreePredictor.nodes``: not a public interface, so
    the bench extra bounds the version and tests/test_next_use_distance.py checks the result)."""
    nodes = predictor.nodes
    leaf = nodes["is_leaf"].astype(bool)
    child = {side: np.where(leaf, -1, nodes[side].astype(np.int64)).tolist() for side in ("left", "right")}  # unsigned there
    return {"feature": nodes["feature_idx"].astype(np.int64).tolist(), "threshold": nodes["num_threshold"].tolist(),
            **child, "value": nodes["value"].tolist()}  # fmt: skip


def main(argv=None) -> int:
    from expertmap.actors.trace_recorder import TraceRecorder
    from expertmap.cluster.workload import load_workload, split

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", required=True, help="JSONL workload whose 70%% split gives the warm-up prompts")
    ap.add_argument("--store-prompts", type=int, default=240, help="warm-up prompts that fill the store (default 240)")
    ap.add_argument("--fit-prompts", type=int, default=60, help="warm-up prompts the model is fitted on (default 60)")
    ap.add_argument("--holdout-prompts", type=int, default=40,
                    help="further warm-up prompts it is evaluated on, with the store of all earlier ones (default 40)")
    ap.add_argument("--max-new-tokens", type=int, default=defaults.MAX_NEW_TOKENS, help="new tokens per prompt")
    ap.add_argument("--seed", type=int, default=0, help="seed of the split and of the sampling (default 0)")
    ap.add_argument("--model", default=str(defaults.BUNDLED_MODEL), type=require_model_folder, help=defaults.MODEL_HELP)
    ap.add_argument("--out", required=True, help="JSON file for the weights")
    ap.add_argument("--distance", default=None, help="JSON file for the next-use distance model (fitted too if given)")
    ap.add_argument("--horizon", type=int, default=8, help="the distance label's censoring, in passes (default 8)")
    ap.add_argument("--traces", default=None,
                    help="pickle of the recorded warm-up traces (list of RequestTrace, split order): read if it exists, "
                    "else recorded and written there")
    a = ap.parse_args(argv)
    warm, _ = split(load_workload(Path(a.workload)), 0.7, a.seed)
    warm = warm[: a.store_prompts + a.fit_prompts + a.holdout_prompts]
    cache = Path(a.traces) if a.traces else None
    if cache is not None and cache.exists():
        with open(cache, "rb") as f:
            traces = pickle.load(f)[: len(warm)]
        if [t.id for t in traces] != [r["id"] for r in warm]:
            raise SystemExit(f"--traces {cache}: not the warm-up prompts of {a.workload} (ids differ)")
    else:
        recorder = TraceRecorder(Path(a.model), "cpu")
        traces = recorder.record_all(warm, a.max_new_tokens, do_sample=True, seed=a.seed, desc="warm-up traces")
        recorder.close()
        if cache is not None:
            with open(cache, "wb") as f:
                pickle.dump(traces, f)
    L, J = len(traces[0].iterations[0].probs), traces[0].iterations[0].probs[0].shape[1]
    n_fit = a.store_prompts + a.fit_prompts
    store_part, fit_part, holdout = traces[: a.store_prompts], traces[a.store_prompts : n_fit], traces[n_fit:]
    index = index_of(store_part, L, J)
    model = fit_next_use(fit_part, index, L, J)
    out = {
        "features": list(FEATURES), "groups": list(GROUPS),
        "weights": [[round(v, 4) for v in w] for w in model.weights],
        "fit": evaluate(model, fit_part, index, L, J),
        "holdout": evaluate(model, holdout, index_of(traces[:n_fit], L, J), L, J) if holdout else None,
        "workload": Path(a.workload).name, "store_prompts": a.store_prompts, "fit_prompts": a.fit_prompts,
        "holdout_prompts": len(holdout),
        "max_new_tokens": a.max_new_tokens, "seed": a.seed,
    }  # fmt: skip
    if a.distance:
        fitted = fit_distance(*distance_rows(fit_part, index, L, J, a.horizon), a.horizon)
        model_d = DistanceModel.from_trees(fitted["baseline"], a.horizon, fitted["trees"])
        if holdout:
            x, y = distance_rows(holdout, index_of(traces[:n_fit], L, J), L, J, a.horizon)
            pred = model_d.log_distance(x.astype(np.float64))
            out["distance_holdout_r2"] = float(1 - ((y - pred) ** 2).mean() / y.var())
        Path(a.distance).parent.mkdir(parents=True, exist_ok=True)
        Path(a.distance).write_text(json.dumps(fitted))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out["weights"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
