"""Each (layer, expert)'s next use, estimated from every signal the run has: `hybrid`'s yardstick.

The oracle wins by knowing when each expert is next needed (Belady). ``NextUseState`` keeps what a
policy can know at a position of the run (iteration i, layer ``now`` computing; -1: the iteration
is starting) and turns it into, for every (layer, expert), the probability ``p`` that it is used
at its layer's next pass (this iteration if its layer is still ahead, else the next one), with a
small logistic model (``NextUseModel``) fitted on warm-up traces (``fit_next_use``):

- the semantic match: the stored map most similar to this iteration's embedding (whole iteration);
- the trajectory match: the stored map whose prefix is most similar to the layers observed so far;
- the cross-layer gate: the next layer's router applied to this layer's router input (layer now+1);
- the request's own recent use: two moving averages of use per iteration, iterations since the
  last use, whether it was used at this iteration's pass of its layer;
- global popularity (the store's mean map); the distance in layers; the iteration's token count.

Three models, by what is known about the expert's next pass: the next layer (the gate has run),
a later layer of this iteration, a layer of the next iteration. The expected time to next use in
layer units is then ``ahead + (1 - p) * L / q`` (its layer comes ``ahead`` layers from now; if that
pass misses, each later pass is a trial at the next-iteration model's rate ``q``), which the policy evicts by (largest first), admits prefetches by
and orders them by (smallest first). Where a ``DistanceModel`` is given (predictor/next_use_distance.py)
it predicts that time itself from the same features. Learned caches that approximate Belady this way: LRB
(Song et al., NSDI '20). Everything here is NumPy over [L, J] arrays (about 0.1 ms a position)
and runs on the policy's background planner.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

EPS = 1e-3
FEATURES = (
    "bias", "semantic", "log semantic", "trajectory", "log trajectory", "gate", "log gate",
    "ewma fast", "ewma slow", "used this pass", "log age", "popularity", "log tokens", "similarity",
    "log ewma slow", "soft ewma", "log soft ewma", "prompt map", "log prompt map", "request rate",
)  # fmt: skip
_COLUMN = {name: i for i, name in enumerate(FEATURES)}
#: (log column, its source column) in FEATURES
_LOGGED = ("semantic", "trajectory", "gate", "ewma slow", "soft ewma", "prompt map")
_LOG_OF = np.array([(_COLUMN["log " + name], _COLUMN[name]) for name in _LOGGED])
GROUPS = ("next layer", "later this iteration", "next iteration")
FAST, SLOW = 0.5, 0.9  # per-iteration decay of the two moving averages of use
SOFT = 0.8  # per-iteration decay of the moving average of the router's distribution


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))


@dataclass(frozen=True)
class NextUseModel:
    """Logistic weights per group (``GROUPS``), each over ``FEATURES``."""

    weights: tuple[tuple[float, ...], ...]

    def __post_init__(self):
        if len(self.weights) != len(GROUPS) or any(len(w) != len(FEATURES) for w in self.weights):
            shape = [len(w) for w in self.weights]
            raise ValueError(f"NextUseModel needs {len(GROUPS)} x {len(FEATURES)} weights, got {shape}")
        object.__setattr__(self, "_w", np.asarray(self.weights, dtype=np.float64))  # [G, F], once

    @classmethod
    def from_file(cls, path: Path) -> "NextUseModel":
        """The weights a ``bench/fit_next_use.py --out`` file holds; ValueError naming the file and
        what does not match (its features and groups must be this code's, in this order)."""
        data = json.loads(Path(path).read_text())
        if data.get("features") != list(FEATURES) or data.get("groups") != list(GROUPS):
            raise ValueError(f"next-use weights {path}: features/groups are not this version's "
                             f"({len(data.get('features', []))} features, groups {data.get('groups')}); re-fit them")  # fmt: skip
        return cls(tuple(tuple(float(v) for v in w) for w in data["weights"]))

    def probability(self, x: np.ndarray, group: np.ndarray) -> np.ndarray:
        return _sigmoid(np.einsum("nf,nf->n", x, self._w[group]))

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """[N, G]: every group's probability for every row of ``x`` [N, F], in one product."""
        return _sigmoid(x @ self._w.T)


class NextUseState:
    """What a policy knows at a position, for the features (fed by the policy's callbacks)."""

    def __init__(self, num_layers: int, num_experts: int):
        L, J = num_layers, num_experts
        self.L, self.J = L, J
        self._layer_of_row = np.repeat(np.arange(L), J)  # [L*J]: row -> layer
        self.ewma_fast = np.zeros((L, J))
        self.ewma_slow = np.zeros((L, J))
        self.last_use = np.full((L, J), -1e6)
        self.used_now = np.zeros((L, J), bool)
        self.semantic = np.full((L, J), 1.0 / J)
        self.trajectory = self.semantic
        self.similarity = 0.0
        self.gate = np.zeros(J)
        self.gate_layer = -1
        self.popularity = np.full((L, J), 1.0 / J)
        self.soft = np.full((L, J), 1.0 / J)  # moving average of the router's mean distribution
        self.prompt = np.full((L, J), 1.0 / J)  # the request's prefill distribution
        self.request_uses = np.zeros((L, J))
        self.request_iterations = 0
        self.tokens = 1
        self.iteration = -1
        self.now = -1
        self._search = None
        self._index_id = None

    # --- updates ----------------------------------------------------------------------------------
    def start(self, iteration: int, index, embedding: np.ndarray | None, tokens: int) -> None:
        self.iteration, self.now, self.tokens = iteration, -1, max(1, int(tokens))
        self.used_now[:] = False
        if self.tokens > 1:  # a prefill: a new request
            self.request_uses[:] = 0.0
            self.request_iterations = 0
        self.request_iterations += 1
        self.gate_layer = -1
        self._search = None
        if index is None or len(index) == 0:
            return
        if id(index) != self._index_id:
            self._index_id = id(index)
            self.popularity = index.maps.mean(axis=0)
        if embedding is not None:
            best, sim = index.semantic(embedding)
            self.semantic = self.trajectory = index.maps[best]
            self.similarity = sim
        self._search = index.trajectory()
        self._maps = index.maps

    def router(self, layer: int, distribution: np.ndarray, gate: np.ndarray | None) -> None:
        """Layer ``layer``'s router ran: its mean distribution [J]; the gate's max over tokens [J]."""
        self.now = layer
        self.soft[layer] = SOFT * self.soft[layer] + (1 - SOFT) * distribution
        if self.tokens > 1:
            self.prompt[layer] = distribution
        if self._search is not None and self._search.observed == layer:
            self._search.observe(layer, distribution)
            best, sim = self._search.best()
            self.trajectory, self.similarity = self._maps[best], sim
        if gate is not None:
            self.gate, self.gate_layer = gate, layer + 1
        else:
            self.gate_layer = -1

    def used(self, layer: int, experts) -> None:
        onehot = np.zeros(self.J)
        onehot[list(experts)] = 1.0
        self.ewma_fast[layer] = FAST * self.ewma_fast[layer] + (1 - FAST) * onehot
        self.ewma_slow[layer] = SLOW * self.ewma_slow[layer] + (1 - SLOW) * onehot
        self.last_use[layer, list(experts)] = self.iteration
        self.used_now[layer] = onehot > 0
        self.request_uses[layer] += onehot

    # --- features -----------------------------------------------------------------------------------
    def features(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(x [L*J, F], group [L*J], ahead [L*J]) at the current position."""
        L, J, now = self.L, self.J, self.now
        layer = self._layer_of_row  # [L*J]
        ahead = np.where(layer > now, layer - now, layer - now + L).astype(np.float64)
        group = np.where(layer <= now, 2, np.where((layer == now + 1) & (self.gate_layer == now + 1), 0, 1))
        C = _COLUMN
        x = np.empty((len(FEATURES), L * J))  # filled by feature rows, returned as its transpose
        x[C["bias"]] = 1.0
        x[C["semantic"]] = self.semantic.reshape(-1)
        x[C["trajectory"]] = self.trajectory.reshape(-1)
        x[C["gate"]] = 0.0
        if 0 <= self.gate_layer < L:
            x[C["gate"], self.gate_layer * J : (self.gate_layer + 1) * J] = self.gate
        x[C["ewma fast"]] = self.ewma_fast.reshape(-1)
        x[C["ewma slow"]] = self.ewma_slow.reshape(-1)
        x[C["used this pass"]] = self.used_now.reshape(-1)
        x[C["log age"]] = np.log1p(np.minimum(np.maximum(0.0, self.iteration - self.last_use.reshape(-1)), 1e3))
        x[C["popularity"]] = self.popularity.reshape(-1)
        x[C["log tokens"]] = np.log(self.tokens)
        x[C["similarity"]] = self.similarity
        x[C["soft ewma"]] = self.soft.reshape(-1)
        x[C["prompt map"]] = self.prompt.reshape(-1)
        x[C["request rate"]] = self.request_uses.reshape(-1) / max(1, self.request_iterations)
        # the log columns: log(v + EPS) of semantic, trajectory, gate, ewma slow, soft ewma, prompt map
        x[_LOG_OF[:, 0]] = np.log(x[_LOG_OF[:, 1]] + EPS)
        return x.T, group, ahead

    def next_use(self, model: NextUseModel, distance=None) -> tuple[np.ndarray, np.ndarray]:
        """(p, expected layers to next use), both [L, J]. ``distance``: a ``DistanceModel``
        (predictor/next_use_distance.py) that predicts the layers to next use itself."""
        x, group, ahead = self.features()
        every = np.clip(model.probabilities(x), EPS, 1 - 1e-6)  # [L*J, G]
        p = every[np.arange(len(group)), group]
        if distance is not None:
            t = distance.layers_to_use(x, group, ahead)
        else:  # after a pass it misses, each later pass is a trial at the next-iteration model's rate q
            t = ahead + (1.0 - p) * self.L / every[:, 2]
        return p.reshape(self.L, self.J), t.reshape(self.L, self.J)


def positions(traces, index, state: NextUseState):
    """Feed ``state`` every position of ``traces`` as a policy sees it: an iteration's start, then
    each layer's router and use events. Yields (iterations, i, now) after each: the flat list of
    iterations, the current one and the last layer computed in it (-1: none yet)."""
    iterations = [it for req in traces for it in req.iterations]
    for i, it in enumerate(iterations):
        state.start(i, index, it.embedding, it.num_tokens)
        for now in range(-1, state.L):
            if now >= 0:
                gate = it.next_gate[now]
                state.router(now, it.probs[now].mean(axis=0), None if gate is None else gate.max(axis=0))
                state.used(now, it.selected[now])
            yield iterations, i, now


def walk(traces, index, num_layers: int, num_experts: int, passes: int = 1, state: NextUseState | None = None):
    """Every position of ``traces`` as a policy would see it: yields (state, label [L*J]) where
    label is 1 if the expert is used at one of its layer's next ``passes`` passes (training data
    for ``fit_next_use``; ``state``: a NextUseState of the traces' shape, e.g. one with more features)."""
    L = num_layers
    state = NextUseState(L, num_experts) if state is None else state
    for iterations, i, now in positions(traces, index, state):
        label = np.zeros((L, num_experts))
        complete = True
        for layer in range(L):
            first = i if layer > now else i + 1
            for src in range(first, first + passes):
                if src >= len(iterations):
                    complete = False
                    break
                label[layer, iterations[src].selected[layer]] = 1.0
        if complete:
            yield state, label.reshape(-1)


def fit_next_use(traces, index, num_layers: int, num_experts: int, l2: float = 1.0, steps: int = 25,
                 passes: int = 1) -> NextUseModel:  # fmt: skip
    """Logistic regression per group (Newton's method, L2 penalty ``l2``) on every position of
    ``traces``: the probability of use at one of the next ``passes`` passes of the expert's layer."""
    xs, gs, ys = [], [], []
    for state, label in walk(traces, index, num_layers, num_experts, passes):
        x, group, _ = state.features()
        xs.append(x.astype(np.float32))
        gs.append(group)
        ys.append(label)
    if not xs:
        raise ValueError("fit_next_use: the traces hold no iteration")
    x, group, y = np.concatenate(xs), np.concatenate(gs), np.concatenate(ys)
    weights = []
    for g in range(len(GROUPS)):
        sel = group == g
        weights.append(tuple(float(v) for v in _logistic(x[sel].astype(np.float64), y[sel], l2, steps)))
    return NextUseModel(tuple(weights))


def _logistic(x: np.ndarray, y: np.ndarray, l2: float, steps: int) -> np.ndarray:
    f = x.shape[1]
    w = np.zeros(f)
    if len(y) == 0:
        return w
    mu, sd = x.mean(0), x.std(0)
    sd[sd < 1e-9] = 1.0
    mu[0], sd[0] = 0.0, 1.0  # the bias column stays as it is
    z = (x - mu) / sd
    reg = np.full(f, l2)
    reg[0] = 0.0
    for _ in range(steps):
        p = _sigmoid(z @ w)
        grad = z.T @ (p - y) + reg * w
        hess = (z * (p * (1 - p))[:, None]).T @ z + np.diag(reg + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-6:
            break
    # back to raw features: w_raw = w / sd, bias absorbs -sum(w * mu / sd)
    raw = w / sd
    raw[0] = w[0] - float((w[1:] * mu[1:] / sd[1:]).sum())
    return raw
