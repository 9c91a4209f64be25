"""`hybrid`: ExpertMap's own policy: FineMoE's map searches and Fate's cross-layer gate feeding a
predicted-Belady cache.

Prediction, as in FineMoE and Fate (both computed on the background planner, off the critical
path; the compute thread only enqueues the router event):
- layer l+1 (next): the cross-layer gate (layer l+1's router on layer l's router input), which
  sees this very token's hidden state: top-(k+1) per token, priority = gate probability;
- layers l+2..l+d: FineMoE's semantic / trajectory search over the expert-map store.

Eviction, where the measurements point (bench/results): on a per-layer balanced model, FineMoE's
probability x whole-run frequency loses to plain LRU, because routing has *request locality*:
what this request used in its last few iterations predicts its next iteration better than
anything counted over the run. So each cached expert gets an estimated probability of use in an
iteration, p = max(request-local EWMA of its use per iteration, its current prediction if its
layer is still ahead in this iteration), and an expected time to next use in layers,
    t = (layers until its layer next comes) + L x (1/p - 1),
and the cache evicts the largest t (Belady's rule with predicted instead of known futures).
The current iteration's best-matching stored map also bounds p from below, for every layer:
p >= map_weight x min(1, k x map probability). decay = 0.8 and map_weight = 1.5 were chosen on
prompts 300-380 of the warm split of dev_mix (never on evaluation prompts); see the README.
Admission uses the same yardstick: a prefetch may evict only an expert expected later than it.
Prefetched experts stay protected until their layer has passed.
"""

from __future__ import annotations

from dataclasses import dataclass

from expertmap.predictor.policies.base import Key
from expertmap.predictor.policies.fate import gate_prediction
from expertmap.predictor.policies.finemoe import FineMoE

P_FLOOR = 1e-3


@dataclass(frozen=True)
class HybridTuning:
    decay: float = 0.8  # per-iteration decay of the request-local use estimate, in (0, 1)
    map_weight: float = 1.5  # weight of the matched map's probability as a floor of p (0: off)


class Hybrid(FineMoE):
    name = "hybrid"
    Tuning = HybridTuning

    def __init__(self, ctx):
        super().__init__(ctx)
        self.decay = self.tuning.decay
        self.map_weight = self.tuning.map_weight
        if not 0.0 < self.decay < 1.0:
            raise ValueError(f"hybrid decay {self.decay} must be in (0, 1)")
        self._gate_plan = []
        self._use: dict[Key, tuple[float, int]] = {}  # key -> (EWMA use per iteration, iteration)
        self._pred_iter: dict[Key, int] = {}  # iteration a current-iteration prediction was made in

    def reset(self):
        super().reset()
        self._gate_plan = []
        self._use.clear()
        self._pred_iter.clear()

    # --- prediction ----------------------------------------------------------------------------
    def on_iteration_start(self, iteration, embedding):
        self._gate_plan = []
        super().on_iteration_start(iteration, embedding)

    def _replan(self):
        """Background thread, newest position only: the map searches' plan, then the gate's."""
        super()._replan()
        it = self.pos.iteration
        for pf in self._plan:
            self._pred_iter[pf.key] = it
        event, self._last_event = self._last_event, None
        if event is not None:
            plan = gate_prediction(event, self.ctx.top_k + 1)  # next router on this router's input
            for pf in plan:
                self.pred_prob[pf.key] = pf.priority
                self._pred_iter[pf.key] = it
            self._gate_plan = plan

    def prefetch_plan(self):
        if not self.ctx.prefetch:
            return []
        nxt = {pf.key[0] for pf in self._gate_plan}
        return self._gate_plan + [pf for pf in self._plan if pf.key[0] not in nxt] or self._hint_plan

    # --- the predicted-Belady cache --------------------------------------------------------------
    def on_layer_start(self, layer, experts):
        super().on_layer_start(layer, experts)
        it = self.pos.iteration
        for e in experts:
            u = self._ewma((layer, e), it)
            self._use[(layer, e)] = (self.decay * u + (1.0 - self.decay), it + 1)

    def _ewma(self, key: Key, iteration: int) -> float:
        value, since = self._use.get(key, (0.0, iteration))
        return value * self.decay ** max(0, iteration - since)

    def use_probability(self, key: Key) -> float:
        p = self._ewma(key, self.pos.iteration)
        if key[0] > self.pos.layer and self._pred_iter.get(key) == self.pos.iteration:
            p = max(p, self.pred_prob.get(key, 0.0))
        if self.map_weight:
            pred = self._layer_pred.get(key[0])
            if pred is not None:
                p = max(p, self.map_weight * min(1.0, self.ctx.top_k * float(pred[0][key[1]])))
        return max(p, P_FLOOR)

    def time_to_next_use(self, key: Key, p: float | None = None) -> float:
        L = self.ctx.num_layers
        ahead = key[0] - self.pos.layer
        layers = ahead if ahead > 0 else L + ahead
        p = self.use_probability(key) if p is None else max(p, P_FLOOR)
        return layers + L * (1.0 / p - 1.0)

    def choose_victim(self, candidates, incoming=None):
        unprotected = [k for k in candidates if not self.is_protected(k)]
        return max(unprotected or candidates, key=self.time_to_next_use)

    def admit(self, prefetch, victim):
        if victim is None:
            return True
        if self.is_protected(victim):
            return False
        p = max(prefetch.priority * (prefetch.key[0] - max(self.pos.layer, -1)), P_FLOOR)  # undo p/distance
        return self.time_to_next_use(prefetch.key, min(p, 1.0)) < self.time_to_next_use(victim)
