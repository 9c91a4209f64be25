"""The next-use distance model (predictor/next_use_distance.py): trees walked as scikit-learn walks
them, worked by hand and against a fitted ensemble; the training labels on a hand-made trace; the
file's errors; the bundled model's file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from expertmap.actors import defaults
from expertmap.actors.trace_recorder import IterationTrace, RequestTrace
from expertmap.predictor.next_use import FEATURES
from expertmap.predictor.next_use_distance import COLUMNS, DistanceModel, training_rows
from expertmap.predictor.policies.hybrid import DISTANCE_FILE, Hybrid

AHEAD = COLUMNS.index("log ahead")


def _hand_model() -> DistanceModel:
    """Tree 0: column 0 <= 0.5 -> 1.0, else (log ahead <= 1.0 -> 2.0, else 3.0), its nodes given
    out of breadth-first order. Tree 1: one leaf, 0.5. Baseline 0.25."""
    tree0 = {  # node 0 root, node 1 = the inner right child, nodes 2-4 leaves
        "feature": [0, AHEAD, 0, 0, 0], "threshold": [0.5, 1.0, 0.0, 0.0, 0.0],
        "left": [2, 3, -1, -1, -1], "right": [1, 4, -1, -1, -1], "value": [0.0, 0.0, 1.0, 2.0, 3.0],
    }  # fmt: skip
    tree1 = {"feature": [0], "threshold": [0.0], "left": [-1], "right": [-1], "value": [0.5]}
    return DistanceModel.from_trees(0.25, 8, [tree0, tree1])


def test_a_hand_made_ensemble_gives_the_sums_worked_by_hand():
    m = _hand_model()
    rows = np.zeros((4, len(COLUMNS)))
    rows[:, 0] = [0.2, 0.5, 0.9, 0.9]  # 0.5 goes left: at most the threshold
    rows[:, AHEAD] = [5.0, 5.0, 0.7, 1.3]
    np.testing.assert_allclose(m.log_distance(rows), [0.25 + 1.0 + 0.5, 0.25 + 1.0 + 0.5,
                                                      0.25 + 2.0 + 0.5, 0.25 + 3.0 + 0.5])  # fmt: skip
    assert m.depth == 2 and m.horizon == 8


def test_layers_to_use_is_never_before_the_next_pass():
    m = _hand_model()
    x = np.zeros((2, len(FEATURES)))
    x[:, 0] = 0.2  # tree 0's left leaf: log distance 1.75, distance e^1.75 = 5.75 layers
    ahead = np.array([3.0, 7.0])
    np.testing.assert_allclose(m.layers_to_use(x, np.zeros(2, np.int64), ahead), [np.exp(1.75), 7.0])


def test_the_ensemble_predicts_what_scikit_learn_predicts():
    pytest.importorskip("sklearn")
    from sklearn.ensemble import HistGradientBoostingRegressor

    from expertmap.bench.fit_next_use import fit_distance

    rng = np.random.default_rng(0)
    x = rng.random((5000, len(COLUMNS))).astype(np.float32)
    y = 2 * x[:, 3] + np.sin(6 * x[:, 5]) + (x[:, AHEAD] > 0.5)
    fitted = fit_distance(x, y, horizon=8, trees=20, leaves=15)
    ours = DistanceModel.from_trees(fitted["baseline"], 8, fitted["trees"])
    theirs = HistGradientBoostingRegressor(max_iter=20, max_leaf_nodes=15, learning_rate=0.1,
                                           early_stopping=False, random_state=0).fit(x, y)  # fmt: skip
    probe = rng.random((300, len(COLUMNS)))
    np.testing.assert_allclose(ours.log_distance(probe), theirs.predict(probe), atol=1e-9)


def test_training_labels_are_the_layers_to_the_next_use_censored_at_the_horizon():
    """One layer, two experts, top-1: expert 0 at iterations 0 and 3, expert 1 at 1 and 2."""
    L, J, use = 1, 2, [0, 1, 1, 0, 1, 1, 1]
    its = [IterationTrace(np.ones(3, np.float32), [np.eye(J, dtype=np.float32)[[e]]], [None], [[e]]) for e in use]
    rows = list(training_rows([RequestTrace("r", "c", "p", "t", its)], None, L, J, horizon=2))
    # two positions per iteration (start, after the layer); with a horizon of 2 iterations
    # 0..4 have labels (5 iterations x 2 positions)
    assert len(rows) == 10 and all(x.shape == (L * J, len(COLUMNS)) for x, _ in rows)
    got = np.exp([y for _, y in rows]).round(6)
    # position (i, -1): the next pass is iteration i's, 1 layer ahead; (i, 0): iteration i + 1's,
    # 1 layer ahead. Each pass an expert misses adds a layer, at most 2 (the horizon).
    want = [[1, 2], [3, 1],  # i = 0: expert 0 used now, next at 3; expert 1 next at 1
            [3, 1], [2, 1],  # i = 1
            [2, 1], [1, 2],  # i = 2: expert 1 next at 4
            [1, 2], [3, 1],  # i = 3: expert 0 never again: censored at 1 + 2
            [3, 1], [3, 1]]  # i = 4
    np.testing.assert_allclose(got, want)


def test_a_bad_file_is_refused_with_its_name_and_the_reason(tmp_path):
    path = tmp_path / DISTANCE_FILE
    path.write_text(json.dumps({"columns": ["bias"], "baseline": 0.0, "horizon": 8, "trees": []}))
    with pytest.raises(ValueError, match=f"{path}: its columns are not this version's"):
        DistanceModel.from_file(path)
    tree = {"feature": [0], "threshold": [0.0], "left": [5], "right": [6], "value": [0.0]}
    path.write_text(json.dumps({"columns": list(COLUMNS), "baseline": 0.0, "horizon": 8, "trees": [tree]}))
    with pytest.raises(ValueError, match=r"tree 0: node 0's children are not new nodes in 0\.\.0"):
        DistanceModel.from_file(path)
    with pytest.raises(ValueError, match="at least one tree"):
        DistanceModel.from_trees(0.0, 8, [])


def test_the_bundled_model_ships_a_distance_model_that_hybrid_loads():
    tuning = Hybrid.tuning_for_model(defaults.BUNDLED_MODEL)
    assert isinstance(tuning.distance, DistanceModel) and tuning.distance.horizon == 8
    x = np.zeros((4, len(FEATURES)))
    t = tuning.distance.layers_to_use(x, np.array([0, 1, 2, 2]), np.array([1.0, 3.0, 5.0, 8.0]))
    assert np.isfinite(t).all() and (t >= [1.0, 3.0, 5.0, 8.0]).all()
