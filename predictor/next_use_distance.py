"""How far each expert's next use is, as a regression: `hybrid`'s eviction order where fitted.

``NextUseState.next_use`` turns a next-pass probability into an expected time to next use,
``ahead + (1 - p) L / q``: every expert that misses its next pass then looks alike (``q`` is small
for all), and so do their evictions. ``DistanceModel`` predicts the log of the distance itself, in
layers, censored at a horizon of passes (the label a learned cache like LRB, Song et al. NSDI '20,
regresses), from the same features plus the group and the layers to the expert's next pass. It is a
small ensemble of regression trees (gradient boosting), fitted off-line by
``bench/fit_next_use.py --distance`` with scikit-learn and evaluated here with NumPy alone: the
trees are arrays, walked for every (expert, tree) at once, one level a step.

File format (``next_use_distance.json``, beside a model's weights): the feature names (the
columns of ``columns``), the baseline, the horizon, and per tree the node arrays ``feature``,
``threshold``, ``left``, ``right`` and ``value``; a leaf is a node whose ``left`` is -1. A row
goes left where its feature is at most the threshold.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from expertmap.predictor.next_use import FEATURES

#: the regression's columns: the next-use features, the group, the log layers to the next pass
COLUMNS = (*FEATURES, "group", "log ahead")


def columns(x: np.ndarray, group: np.ndarray, ahead: np.ndarray) -> np.ndarray:
    """[N, len(COLUMNS)] from ``NextUseState.features()``'s (x [N, F], group [N], ahead [N])."""
    return np.concatenate([x, group[:, None], np.log(ahead)[:, None]], axis=1)


@dataclass(frozen=True, eq=False)
class DistanceModel:
    """Boosted regression trees for log(layers to next use), all trees' nodes in flat arrays, each
    node's right child next to its left one (so a step is ``left + (x > threshold)``)."""

    baseline: float
    horizon: int  # passes: the label's censoring
    roots: np.ndarray  # [T] each tree's root node
    feature: np.ndarray  # [nodes] column of each node's split (0 at leaves)
    threshold: np.ndarray  # [nodes] go left where x[feature] <= threshold (+inf at leaves)
    left: np.ndarray  # [nodes] the left child; the right one is left + 1; a leaf points at itself
    value: np.ndarray  # [nodes] a leaf's contribution (0 elsewhere)
    depth: int  # the deepest leaf: steps of the walk

    @classmethod
    def from_trees(cls, baseline: float, horizon: int, trees: list[dict]) -> "DistanceModel":
        """From per-tree node lists (the file's ``trees``: -1 children mark a leaf); ValueError
        naming the bad tree."""
        if not trees:
            raise ValueError("a distance model needs at least one tree")
        roots, feature, threshold, left, value = [], [], [], [], []
        depth = 0
        for i, t in enumerate(trees):
            lo, hi = list(map(int, t["left"])), list(map(int, t["right"]))
            m = len(lo)
            if not (len(hi) == len(t["feature"]) == len(t["threshold"]) == len(t["value"]) == m):
                raise ValueError(f"distance model tree {i}: its node arrays differ in length")
            order, seen = [0], {0}  # breadth first, each inner node's children side by side
            for node in order:
                if lo[node] >= 0:
                    if not (0 <= lo[node] < m and 0 <= hi[node] < m) or {lo[node], hi[node]} & seen:
                        raise ValueError(f"distance model tree {i}: node {node}'s children are not new nodes in 0..{m - 1}")
                    if not 0 <= int(t["feature"][node]) < len(COLUMNS):
                        raise ValueError(f"distance model tree {i}: node {node} splits on column {t['feature'][node]}, "
                                         f"not one of 0..{len(COLUMNS) - 1}")  # fmt: skip
                    order += [lo[node], hi[node]]
                    seen |= {lo[node], hi[node]}
            base = len(feature)
            at = {node: base + k for k, node in enumerate(order)}
            roots.append(base)
            level = {0: 0}
            for node in order:
                inner = lo[node] >= 0
                feature.append(int(t["feature"][node]) if inner else 0)
                threshold.append(float(t["threshold"][node]) if inner else np.inf)
                left.append(at[lo[node]] if inner else at[node])
                value.append(0.0 if inner else float(t["value"][node]))
                if inner:
                    level[lo[node]] = level[hi[node]] = level[node] + 1
                else:
                    depth = max(depth, level[node])
        return cls(float(baseline), int(horizon), np.asarray(roots, np.int64), np.asarray(feature, np.int64),
                   np.asarray(threshold), np.asarray(left, np.int64), np.asarray(value), depth)  # fmt: skip

    @classmethod
    def from_file(cls, path: Path) -> "DistanceModel":
        """The model a ``bench/fit_next_use.py --distance`` file holds; ValueError naming the file
        and what does not match (its columns must be this code's, in this order)."""
        data = json.loads(Path(path).read_text())
        if data.get("columns") != list(COLUMNS):
            raise ValueError(f"next-use distance model {path}: its columns are not this version's "
                             f"({len(data.get('columns', []))} columns); re-fit it")  # fmt: skip
        try:
            return cls.from_trees(data["baseline"], data["horizon"], data["trees"])
        except (KeyError, ValueError) as exc:
            raise ValueError(f"next-use distance model {path}: {exc}") from exc

    def log_distance(self, rows: np.ndarray) -> np.ndarray:
        """[N] predicted log(layers to next use) for ``rows`` [N, len(COLUMNS)]."""
        n, c = rows.shape
        flat = np.ascontiguousarray(rows, dtype=np.float64).ravel()
        start = np.repeat(np.arange(n) * c, len(self.roots))  # [N*T] each (row, tree)'s row offset
        node = np.tile(self.roots, n)  # [N*T]
        for _ in range(self.depth):  # a leaf steps to itself: +inf threshold, left = itself
            x = flat.take(start + self.feature.take(node))
            node = self.left.take(node) + (x > self.threshold.take(node))
        return self.baseline + self.value.take(node).reshape(n, -1).sum(axis=1)

    def layers_to_use(self, x: np.ndarray, group: np.ndarray, ahead: np.ndarray) -> np.ndarray:
        """[N] expected layers to each row's next use, never before its next pass (``ahead``)."""
        return np.maximum(np.exp(self.log_distance(columns(x, group, ahead))), ahead)


def training_rows(traces, index, num_layers: int, num_experts: int, horizon: int):
    """Every position of ``traces`` as a policy would see it (``next_use.positions``), as
    (rows [L*J, len(COLUMNS)], log distance [L*J]): the layers from the position to each expert's
    next use, censored at ``horizon`` passes of its layer; positions whose horizon runs past the
    traces are left out (their label is unknown)."""
    from expertmap.predictor.next_use import NextUseState, positions

    L, J = num_layers, num_experts
    state = NextUseState(L, J)
    layer_of, expert_of = np.repeat(np.arange(L), J), np.tile(np.arange(J), L)  # [L*J] each
    nxt = None
    for iterations, i, now in positions(traces, index, state):
        if nxt is None:
            nxt = _next_pass(iterations, L, J)
        if i + horizon >= len(iterations):
            continue
        first = np.where(layer_of > now, i, i + 1)  # [L*J] the iteration of each expert's next pass
        missed = np.minimum(nxt[first, layer_of, expert_of] - first, horizon)  # passes before its use
        x, group, ahead = state.features()
        yield columns(x, group, ahead), np.log(ahead + L * missed)


def _next_pass(iterations, L: int, J: int) -> np.ndarray:
    """[I + 1, L, J]: the first iteration at or after i whose pass of layer l uses expert e (I: none)."""
    n = len(iterations)
    out = np.full((n + 1, L, J), n, np.int64)
    for i in range(n - 1, -1, -1):
        out[i] = out[i + 1]
        for layer, experts in enumerate(iterations[i].selected):
            out[i, layer, list(experts)] = i
    return out
